import Foundation
import Logging
import Testing
@testable import TransferEngine

/// The handshake server's reply path against a client that reads late.
@Suite("Handshake server replies", .serialized)
struct HandshakeServerTests {
    @Test("a 16 MiB metadata reply to a client that starts reading late arrives whole")
    func largeReplyToSlowReader() throws {
        // Digits in a JSON string: 16 MiB, far more than a socket takes before its peer reads.
        let body = "\"" + String(repeating: "0123456789abcdef", count: 1 << 20) + "\""
        let server = try HandshakeServer(listener: try Socket.listen(host: "127.0.0.1", port: 0), maxLength: 64 << 20,
                                         logger: Logger(label: "handshake-test")) { $0.kind == .metadata ? body : nil }
        defer { server.stop() }
        let socket = try Socket.connect(host: "127.0.0.1", port: server.port, timeoutMs: 2000)
        defer { socket.close() }
        try HandshakeWire.Message(kind: .metadata, json: "{}").encoded.withUnsafeBytes { try socket.sendAll([$0]) }
        usleep(300_000)
        socket.setTimeouts(receiveMs: 10_000, sendMs: 1000)
        let reply = try HandshakeClient.receive(on: socket, maxLength: 64 << 20)
        #expect(reply.kind == .metadata)
        #expect(reply.json == body)
    }
}
