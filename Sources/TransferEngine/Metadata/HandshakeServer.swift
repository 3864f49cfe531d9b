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
    private let stopped = ConditionLock(false)

    /// Threads that each accept and serve connections. Persistent workers avoid
    /// creating a thread per handshake (a large part of a first connection's cost);
    /// several of them keep one slow client from stalling the rest (upstream serves
    /// connections one at a time).
    static let workers = 4

    /// The bound port.
    let port: UInt16

    init(listener: Socket, maxLength: Int, logger: Logger, handler: @escaping Handler) throws {
        self.listener = listener
        self.handler = handler
        self.logger = logger
        self.maxLength = maxLength
        self.port = listener.localAddress.port
        for _ in 0..<Self.workers {
            try OSThread.spawn(name: "te-handshake") { [self] in acceptLoop() }
        }
    }

    func stop() {
        stopped.withLock { $0 = true }
        listener.shutdownBoth()
    }

    private func acceptLoop() {
        while true {
            guard let connection = try? listener.accept() else { return }
            if stopped.withLock({ $0 }) { connection.close(); return }
            serve(connection)
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
