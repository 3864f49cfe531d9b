/// Sends one handshake message to a peer's handshake port and reads the reply.
enum HandshakeClient {
    /// Timeouts for one exchange (and the shared secret, when authentication is on).
    struct Timeouts: Sendable {
        var connectMs: Int
        var replyMs: Int
        var auth: PeerAuthenticator? = nil
    }

    /// Connects, sends `message`, and returns the reply (which must have the same kind).
    static func exchange(host: String, port: UInt16, message: HandshakeWire.Message, timeouts: Timeouts,
                         maxLength: Int = HandshakeWire.defaultMaxLength) throws -> HandshakeWire.Message {
        let socket = try Socket.connect(host: host, port: port, timeoutMs: timeouts.connectMs)
        defer { socket.close() }
        socket.setTimeouts(receiveMs: timeouts.replyMs, sendMs: timeouts.replyMs)
        if let auth = timeouts.auth {
            // Bounded by the connect timeout: a server without authentication never sends a
            // challenge, and the exchange should fail as fast as an unreachable peer does.
            try auth.authenticateAsClient(socket, channel: .handshake, deadline: MonotonicClock.nanoseconds() + UInt64(timeouts.connectMs) * 1_000_000)
        }
        let bytes = message.encoded
        try bytes.withUnsafeBytes { try socket.sendAll([$0]) }
        let reply = try receive(on: socket, maxLength: maxLength)
        guard reply.kind == message.kind else {
            throw EngineError.transferFailed("handshake reply type \(reply.kind) does not match request type \(message.kind)")
        }
        return reply
    }

    /// Reads one framed message (length prefix, then body) from a socket. Used by both sides.
    static func receive(on socket: Socket, maxLength: Int) throws -> HandshakeWire.Message {
        var length: UInt64 = 0
        try socket.receiveAll(&length, count: 8)
        let count = try HandshakeWire.checkLength(length, limit: maxLength)
        var body = [UInt8](repeating: 0, count: count)
        try body.withUnsafeMutableBytes { try socket.receiveAll($0.baseAddress!, count: count) }
        return try HandshakeWire.decodeBody(body)
    }
}
