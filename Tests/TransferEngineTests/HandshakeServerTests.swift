import Foundation
import Logging
import Testing
@testable import TransferEngine

/// The handshake server's I/O thread answers cheap kinds itself (`inlineKinds`); these check what
/// that must not change: a reply the socket does not take at once still arrives whole, and `stop`
/// still waits for a handler that is running.
@Suite("Handshake server answering on its I/O thread", .serialized)
struct HandshakeServerTests {
    final class Flag: @unchecked Sendable {
        private let lock = NSLock()
        private var value = false
        var isSet: Bool { lock.withLock { value } }
        func set() { lock.withLock { value = true } }
    }

    private func server(inline: Set<HandshakeWire.Kind>, handler: @escaping HandshakeServer.Handler) throws -> HandshakeServer {
        try HandshakeServer(listener: try Socket.listen(host: "127.0.0.1", port: 0), maxLength: 64 << 20,
                            logger: Logger(label: "handshake-test"), inlineKinds: inline, handler: handler)
    }

    private func send(_ message: HandshakeWire.Message, to port: UInt16) throws -> Socket {
        let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
        try message.encoded.withUnsafeBytes { try socket.sendAll([$0]) }
        return socket
    }

    @Test("a 16 MiB metadata reply to a client that starts reading late arrives whole (the I/O thread sends what fits, a worker the rest)")
    func largeReplyToSlowReader() throws {
        // Digits in a JSON string: 16 MiB, far more than a socket takes before its peer reads.
        let body = "\"" + String(repeating: "0123456789abcdef", count: 1 << 20) + "\""
        let server = try server(inline: [.metadata]) { $0.kind == .metadata ? body : nil }
        defer { server.stop() }
        let socket = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { socket.close() }
        usleep(300_000)
        socket.setTimeouts(receiveMs: 10_000, sendMs: 1000)
        let reply = try HandshakeClient.receive(on: socket, maxLength: 64 << 20)
        #expect(reply.kind == .metadata)
        #expect(reply.json.utf8.count == body.utf8.count)
        #expect(reply.json == body)
    }

    @Test("a slow handler of a worker kind does not hold up an inline probe")
    func inlineProbeBesideSlowWorker() throws {
        let server = try server(inline: [.probe]) { message in
            if message.kind == .connection { usleep(1_500_000) }
            return "{}"
        }
        defer { server.stop() }
        let slow = try send(.init(kind: .connection, json: "{}"), to: server.port)
        defer { slow.close() }
        usleep(100_000)
        let started = Date()
        let reply = try HandshakeClient.exchange(host: "127.0.0.1", port: server.port, message: .init(kind: .probe, json: "{}"),
                                                 timeouts: .init(connectMs: 2000, replyMs: 5000))
        #expect(reply.json == "{}")
        #expect(Date().timeIntervalSince(started) < 1.0)
    }

    @Test("stop waits for a handler running on the I/O thread, so none is inside a plugin the engine unloads next")
    func stopWaitsForInlineHandler() throws {
        let entered = Flag(), returned = Flag()
        let server = try server(inline: [.metadata]) { _ in
            entered.set()
            usleep(400_000)
            returned.set()
            return "{}"
        }
        let socket = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { socket.close() }
        let deadline = Date().addingTimeInterval(5)
        while !entered.isSet && Date() < deadline { usleep(1000) }
        #expect(entered.isSet)
        server.stop()
        #expect(returned.isSet, "stop returned while the handler was still running")
    }
}
