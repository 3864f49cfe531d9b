import CTransferEngineShims
import Logging

/// Accepts connections on a listener and serves each on its own thread, at
/// most `limit` at once and `perAddressLimit` from one address (a peer must not be
/// able to exhaust threads, nor one address every slot). Used by the TCP data server.
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
    /// One lock for admission, stop and the hand-over, so no connection is admitted after `stop`
    /// began and a follower still waiting then never starts to lead.
    private let connections = ConditionLock(Table())

    /// Open connections, how many come from each address, and the acceptor's state.
    private struct Table {
        var sockets: [Int32: (socket: Socket, address: String)] = [:]
        var perAddress: [String: Int] = [:]
        var refusals = WarningThrottle()
        var stopped = false
        /// The leader took a connection: the waiting follower accepts from now on.
        var handedOver = false
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
        // The tables' storage now, not on the first connection: the runtime builds these types'
        // metadata on first use, which that connection would wait for (README, "Performance").
        connections.withLock { table in
            table.sockets.reserveCapacity(16)
            table.perAddress.reserveCapacity(16)
        }
        try OSThread.spawn(name: "te-accept") { [self] in lead() }
    }

    /// Whether `stop` was called.
    var isStopped: Bool { connections.withLock { $0.stopped } }

    /// Connections being served.
    var count: Int { connections.withLock { $0.sockets.count } }

    /// Stops accepting, shuts every open connection down and waits (at most `waitMs`) until their
    /// threads have ended, so no peer's request touches memory after this returns (idempotent).
    /// Returns false when some were still running at `waitMs`.
    @discardableResult
    func stop(waitMs: Int = 5000) -> Bool {
        let already = connections.withLock(notify: true) { table -> Bool in defer { table.stopped = true }; return table.stopped }
        if already { return connections.withLock { $0.sockets.isEmpty } }
        listener.shutdownBoth()
        connections.withLock { $0.sockets.values.forEach { $0.socket.shutdownBoth() } }
        let deadline = MonotonicClock.nanoseconds() + UInt64(waitMs) * 1_000_000
        if connections.wait(deadline: deadline, until: { $0.sockets.isEmpty ? true : nil }) == nil {
            logger.warning("\(name): \(count) connection threads still running \(waitMs) ms after stop")
            return false
        }
        return true
    }

    private enum Admission { case admitted, refused(reason: String, log: Int?), stopped }

    /// Accepts until it admits a connection, then serves that one while its follower accepts.
    private func lead() {
        // Started before this leader accepts: an isolated new connection then waits for no thread
        // creation (one right behind it waits for the follower to wake and start its own).
        var follower = startFollower()
        while true {
            let accepted: Socket?
            do { accepted = try listener.accept() } catch {
                logger.error("\(name) listener failed: \(error)")
                return
            }
            guard let connection = accepted else {
                if !isStopped { logger.error("\(name): the listener closed; no more connections are accepted") }
                return
            }
            let address = connection.peerAddress.host
            // Under the lock stop takes: nothing is admitted once it began.
            let admission = connections.withLock { table -> Admission in
                if table.stopped { return .stopped }
                let reason: String
                if table.sockets.count >= limit {
                    reason = "\(limit) connections already open"
                } else if table.perAddress[address, default: 0] >= perAddressLimit {
                    reason = "\(perAddressLimit) connections from \(address) already open"
                } else {
                    table.sockets[connection.fd] = (connection, address)
                    table.perAddress[address, default: 0] += 1
                    if follower { table.handedOver = true }
                    return .admitted
                }
                return .refused(reason: reason, log: table.refusals.record(now: MonotonicClock.nanoseconds()))
            }
            switch admission {
            case .stopped:
                connection.close()
                return
            case .refused(let reason, let log):
                if let count = log {
                    logger.warning("\(name): refusing connections (\(count) since the last such line), latest from \(connection.peerAddress): \(reason)")
                }
                refuse(connection)
                connection.close()
                continue
            case .admitted:
                break
            }
            if follower {
                connections.notifyAll()
            } else {
                do {
                    try OSThread.spawn(name: "te-accept") { [self] in lead() }
                } catch {
                    logger.error("\(name): cannot start a thread for a connection: \(error)")
                    forget(connection)
                    connection.close()
                    follower = startFollower()
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

    /// Starts the thread that will accept after this one; false (with a warning) when it cannot,
    /// and this leader then starts a new leader only when it takes a connection.
    private func startFollower() -> Bool {
        guard !isStopped else { return false }
        do {
            try OSThread.spawn(name: "te-accept") { [self] in follow() }
            return true
        } catch {
            logger.warning("\(name): cannot start a standby accept thread (\(error)); one is started per connection instead")
            return false
        }
    }

    /// Waits until the leader hands over (then leads) or the acceptor stops.
    private func follow() {
        let leads = connections.wait { table -> Bool? in
            if table.stopped { return false }
            if table.handedOver {
                table.handedOver = false
                return true
            }
            return nil
        }
        if leads == true { lead() }
    }

    private func forget(_ connection: Socket) {
        let stopping = connections.withLock { table -> Bool in
            if let entry = table.sockets.removeValue(forKey: connection.fd) {
                table.perAddress[entry.address, default: 1] -= 1
                if table.perAddress[entry.address] == 0 { table.perAddress.removeValue(forKey: entry.address) }
            }
            return table.stopped
        }
        // Only stop waits for connections to end; anyone else woken would be the follower.
        if stopping { connections.notifyAll() }
    }
}
