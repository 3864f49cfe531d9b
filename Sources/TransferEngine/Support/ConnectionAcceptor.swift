import Logging

/// Accepts connections on a listener and serves each on its own thread, at
/// most `limit` at once (a peer must not be able to exhaust threads). Shared
/// by the TCP data server and the HTTP metadata server.
final class ConnectionAcceptor: @unchecked Sendable {
    private let listener: Socket
    private let limit: Int
    private let name: String
    private let logger: Logger
    private let refuse: @Sendable (Socket) -> Void
    private let serve: @Sendable (Socket) -> Void
    private let connections = ConditionLock<[Int32: Socket]>([:])
    private let stopped = ConditionLock(false)

    /// Starts the accept thread. `refuse` answers a connection over the limit before it is closed.
    init(listener: Socket, limit: Int, name: String, logger: Logger,
         refuse: @escaping @Sendable (Socket) -> Void, serve: @escaping @Sendable (Socket) -> Void) throws {
        self.listener = listener
        self.limit = limit
        self.name = name
        self.logger = logger
        self.refuse = refuse
        self.serve = serve
        try OSThread.spawn(name: "te-accept") { [self] in acceptLoop() }
    }

    /// Whether `stop` was called.
    var isStopped: Bool { stopped.withLock { $0 } }

    /// Connections being served.
    var count: Int { connections.withLock { $0.count } }

    /// Stops accepting and shuts every open connection down (idempotent).
    func stop() {
        let already = stopped.withLock { state -> Bool in defer { state = true }; return state }
        if already { return }
        listener.shutdownBoth()
        connections.withLock { $0.values.forEach { $0.shutdownBoth() } }
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
            let admitted = connections.withLock { table -> Bool in
                guard table.count < limit else { return false }
                table[connection.fd] = connection
                return true
            }
            if !admitted {
                logger.warning("\(name): refusing a connection from \(connection.peerAddress): \(limit) connections already open")
                refuse(connection)
                connection.close()
                continue
            }
            do {
                try OSThread.spawn(name: "te-serve") { [self] in
                    serve(connection)
                    connections.withLock { _ = $0.removeValue(forKey: connection.fd) }
                    connection.close()
                }
            } catch {
                logger.error("\(name): cannot start a thread for a connection: \(error)")
                connections.withLock { _ = $0.removeValue(forKey: connection.fd) }
                connection.close()
            }
        }
    }
}
