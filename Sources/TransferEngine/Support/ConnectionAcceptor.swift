import Logging

/// Accepts connections on a listener and serves each on its own thread, at
/// most `limit` at once and `perAddressLimit` from one address (a peer must not be
/// able to exhaust threads, nor one address every slot). Shared by the TCP data
/// server and the HTTP metadata server.
final class ConnectionAcceptor: @unchecked Sendable {
    private let listener: Socket
    private let limit: Int
    private let perAddressLimit: Int
    private let name: String
    private let logger: Logger
    private let refuse: @Sendable (Socket) -> Void
    private let serve: @Sendable (Socket) -> Void
    private let connections = ConditionLock(Table())
    private let stopped = ConditionLock(false)

    /// Open connections, and how many come from each address.
    private struct Table {
        var sockets: [Int32: (socket: Socket, address: String)] = [:]
        var perAddress: [String: Int] = [:]
        var refusals = WarningThrottle()
    }

    /// Starts the accept thread. `refuse` answers a connection over the limit before it is closed.
    init(listener: Socket, limit: Int, perAddressLimit: Int, name: String, logger: Logger,
         refuse: @escaping @Sendable (Socket) -> Void, serve: @escaping @Sendable (Socket) -> Void) throws {
        self.listener = listener
        self.limit = limit
        self.perAddressLimit = perAddressLimit
        self.name = name
        self.logger = logger
        self.refuse = refuse
        self.serve = serve
        try OSThread.spawn(name: "te-accept") { [self] in acceptLoop() }
    }

    /// Whether `stop` was called.
    var isStopped: Bool { stopped.withLock { $0 } }

    /// Connections being served.
    var count: Int { connections.withLock { $0.sockets.count } }

    /// Stops accepting, shuts every open connection down and waits (at most `waitMs`) until their
    /// threads have ended, so no peer's request touches memory after this returns (idempotent).
    func stop(waitMs: Int = 5000) {
        let already = stopped.withLock { state -> Bool in defer { state = true }; return state }
        if already { return }
        listener.shutdownBoth()
        connections.withLock { $0.sockets.values.forEach { $0.socket.shutdownBoth() } }
        let deadline = MonotonicClock.nanoseconds() + UInt64(waitMs) * 1_000_000
        if connections.wait(deadline: deadline, until: { $0.sockets.isEmpty ? true : nil }) == nil {
            logger.warning("\(name): \(count) connection threads still running \(waitMs) ms after stop")
        }
    }

    private func acceptLoop() {
        while true {
            let accepted: Socket?
            do { accepted = try listener.accept() } catch {
                logger.error("\(name) listener failed: \(error)")
                return
            }
            guard let connection = accepted else { return }
            if isStopped { connection.close(); return }
            let address = connection.peerAddress.host
            // nil: admitted; else why not, and whether to log it now (at most every 10 s, with a count).
            let refusal = connections.withLock { table -> (reason: String, log: Int?)? in
                let reason: String
                if table.sockets.count >= limit {
                    reason = "\(limit) connections already open"
                } else if table.perAddress[address, default: 0] >= perAddressLimit {
                    reason = "\(perAddressLimit) connections from \(address) already open"
                } else {
                    table.sockets[connection.fd] = (connection, address)
                    table.perAddress[address, default: 0] += 1
                    return nil
                }
                return (reason, table.refusals.record(now: MonotonicClock.nanoseconds()))
            }
            if let refusal {
                if let count = refusal.log {
                    logger.warning("\(name): refusing connections (\(count) since the last such line), latest from \(connection.peerAddress): \(refusal.reason)")
                }
                refuse(connection)
                connection.close()
                continue
            }
            do {
                try OSThread.spawn(name: "te-serve") { [self] in
                    serve(connection)
                    forget(connection)
                    connection.close()
                }
            } catch {
                logger.error("\(name): cannot start a thread for a connection: \(error)")
                forget(connection)
                connection.close()
            }
        }
    }

    private func forget(_ connection: Socket) {
        connections.withLock(notify: true) { table in
            guard let entry = table.sockets.removeValue(forKey: connection.fd) else { return }
            table.perAddress[entry.address, default: 1] -= 1
            if table.perAddress[entry.address] == 0 { table.perAddress.removeValue(forKey: entry.address) }
        }
    }
}
