import CTransferEngineShims
import Logging

/// Accepts connections on a listener and serves each on its own thread, at
/// most `limit` at once and `perAddressLimit` from one address (a peer must not be
/// able to exhaust threads, nor one address every slot). Shared by the TCP data
/// server and the HTTP metadata server.
///
/// The thread that accepts a connection serves it, and a follower thread, started while the
/// leader was still waiting, takes over accepting (leader/follower): a new peer's first request is
/// read at once, not after a thread is created and scheduled for it.
final class ConnectionAcceptor: @unchecked Sendable {
    private let listener: Socket
    private let limit: Int
    private let perAddressLimit: Int
    private let name: String
    private let logger: Logger
    private let refuse: @Sendable (Socket) -> Void
    private let serve: @Sendable (Socket) -> Void
    private let connections = ConditionLock(Table())
    private let control = ConditionLock(Control())

    private struct Control {
        var stopped = false
        /// The leader took a connection: the waiting follower accepts from now on.
        var handedOver = false
    }

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
        try OSThread.spawn(name: "te-accept") { [self] in lead() }
    }

    /// Whether `stop` was called.
    var isStopped: Bool { control.withLock { $0.stopped } }

    /// Connections being served.
    var count: Int { connections.withLock { $0.sockets.count } }

    /// Stops accepting, shuts every open connection down and waits (at most `waitMs`) until their
    /// threads have ended, so no peer's request touches memory after this returns (idempotent).
    func stop(waitMs: Int = 5000) {
        let already = control.withLock(notify: true) { state -> Bool in defer { state.stopped = true }; return state.stopped }
        if already { return }
        listener.shutdownBoth()
        connections.withLock { $0.sockets.values.forEach { $0.socket.shutdownBoth() } }
        let deadline = MonotonicClock.nanoseconds() + UInt64(waitMs) * 1_000_000
        if connections.wait(deadline: deadline, until: { $0.sockets.isEmpty ? true : nil }) == nil {
            logger.warning("\(name): \(count) connection threads still running \(waitMs) ms after stop")
        }
    }

    /// Accepts until it admits a connection, then serves that one while its follower accepts.
    private func lead() {
        // Started before accepting, so starting it costs no connection any time.
        var follower = (try? OSThread.spawn(name: "te-accept") { [self] in follow() }) != nil
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
            if follower {
                control.withLock(notify: true) { $0.handedOver = true }
            } else {
                do {
                    try OSThread.spawn(name: "te-accept") { [self] in lead() }
                } catch {
                    logger.error("\(name): cannot start a thread for a connection: \(error)")
                    forget(connection)
                    connection.close()
                    follower = (try? OSThread.spawn(name: "te-accept") { [self] in follow() }) != nil
                    continue
                }
            }
            te_set_thread_name("te-serve")
            serve(connection)
            forget(connection)
            connection.close()
            return
        }
    }

    /// Waits until the leader hands over (then leads) or the acceptor stops.
    private func follow() {
        let leads = control.wait { state -> Bool? in
            if state.handedOver {
                state.handedOver = false
                return true
            }
            return state.stopped ? false : nil
        }
        if leads == true { lead() }
    }

    private func forget(_ connection: Socket) {
        connections.withLock(notify: true) { table in
            guard let entry = table.sockets.removeValue(forKey: connection.fd) else { return }
            table.perAddress[entry.address, default: 1] -= 1
            if table.perAddress[entry.address] == 0 { table.perAddress.removeValue(forKey: entry.address) }
        }
    }
}
