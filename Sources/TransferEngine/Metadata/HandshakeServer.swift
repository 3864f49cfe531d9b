import Logging

/// The handshake (RPC) port: answers Metadata, Notify, Probe and Connection
/// messages in the official framing, one request per connection.
///
/// Unlike upstream's serial loop, each connection is served on its own thread
/// (up to `maxConcurrent`), so one slow client cannot stall the others.
final class HandshakeServer: @unchecked Sendable {
    typealias Handler = @Sendable (HandshakeWire.Message) -> String?

    private let listener: Socket
    private let handler: Handler
    private let logger: Logger
    private let maxLength: Int
    private let active = ConditionLock(0)
    private let maxConcurrent = 64
    private let stopped = ConditionLock(false)

    /// The bound port.
    let port: UInt16

    init(listener: Socket, maxLength: Int, logger: Logger, handler: @escaping Handler) throws {
        self.listener = listener
        self.handler = handler
        self.logger = logger
        self.maxLength = maxLength
        self.port = listener.localAddress.port
        try OSThread.spawn(name: "te-handshake") { [self] in acceptLoop() }
    }

    func stop() {
        stopped.withLock { $0 = true }
        listener.shutdownBoth()
        listener.close()
    }

    private func acceptLoop() {
        while true {
            guard let connection = try? listener.accept() else { return }
            if stopped.withLock({ $0 }) { connection.close(); return }
            let admitted = active.withLock { count -> Bool in
                guard count < maxConcurrent else { return false }
                count += 1
                return true
            }
            if !admitted {
                serve(connection)  // saturated: serve serially, as upstream always does
                continue
            }
            do {
                try OSThread.spawn(name: "te-handshake-c") { [self] in
                    serve(connection)
                    active.withLock { $0 -= 1 }
                }
            } catch {
                active.withLock { $0 -= 1 }
                serve(connection)
            }
        }
    }

    private func serve(_ connection: Socket) {
        defer { connection.close() }
        connection.setTimeouts(receiveMs: 5000, sendMs: 5000)
        let peer = connection.peerAddress.description
        do {
            let request = try HandshakeClient.receive(on: connection, maxLength: maxLength)
            guard let replyJSON = handler(request) else {
                logger.warning("handshake: refused a \(request.kind) message from \(peer)")
                return
            }
            let reply = HandshakeWire.Message(kind: request.kind, json: replyJSON, legacy: request.legacy)
            try reply.encoded.withUnsafeBytes { try connection.sendAll([$0]) }
            connection.shutdownWrite()
            // Upstream clients close first; wait briefly for that so the reply is not reset.
            connection.setTimeouts(receiveMs: 1000, sendMs: 1000)
            var scratch: UInt8 = 0
            _ = try? connection.receiveSome(&scratch, count: 1)
        } catch {
            logger.warning("handshake: bad message from \(peer): \(error)")
        }
    }
}
