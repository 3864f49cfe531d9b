import Foundation
import Logging
import Testing
@testable import TransferEngine

/// The handshake server's reply paths: workers, and the I/O thread's own answers (`inline`), which
/// must still arrive whole to a late reader, give way to a worker when they have no cheap answer,
/// not wait behind busy workers, and be waited for by `stop`.
@Suite("Handshake server replies", .serialized)
struct HandshakeServerTests {
    final class Flag: @unchecked Sendable {
        private let lock = NSLock()
        private var value = false
        var isSet: Bool { lock.withLock { value } }
        func set() { lock.withLock { value = true } }
    }

    private func server(inline: HandshakeServer.Inline?, handler: @escaping HandshakeServer.Handler) throws -> HandshakeServer {
        try HandshakeServer(listener: try Socket.listen(host: "127.0.0.1", port: 0), maxLength: 64 << 20,
                            logger: Logger(label: "handshake-test"), inline: inline, handler: handler)
    }

    private func send(_ message: HandshakeWire.Message, to port: UInt16) throws -> Socket {
        let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
        try message.encoded.withUnsafeBytes { try socket.sendAll([$0]) }
        return socket
    }

    private func exchange(_ kind: HandshakeWire.Kind, port: UInt16) throws -> HandshakeWire.Message {
        try HandshakeClient.exchange(host: "127.0.0.1", port: port, message: .init(kind: kind, json: "{}"),
                                     timeouts: .init(connectMs: 2000, replyMs: 5000))
    }

    @Test("a 16 MiB metadata reply to a client that starts reading late arrives whole, from a worker and from the I/O thread (which leaves the rest to a worker)",
          arguments: [false, true])
    func largeReplyToSlowReader(inlined: Bool) throws {
        // Digits in a JSON string: 16 MiB, far more than a socket takes before its peer reads.
        let body = "\"" + String(repeating: "0123456789abcdef", count: 1 << 20) + "\""
        let inline = inlined ? HandshakeServer.Inline(kinds: [.metadata]) { _ in body } : nil
        let server = try server(inline: inline) { $0.kind == .metadata && !inlined ? body : nil }
        defer { server.stop() }
        let socket = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { socket.close() }
        usleep(300_000)
        socket.setTimeouts(receiveMs: 10_000, sendMs: 1000)
        let reply = try HandshakeClient.receive(on: socket, maxLength: 64 << 20)
        #expect(reply.kind == .metadata)
        #expect(reply.json == body)
    }

    @Test("no inline answer: the request goes to a worker and the full handler answers it")
    func inlineDeclines() throws {
        let server = try server(inline: .init(kinds: [.metadata]) { _ in nil }) { _ in #"{"from":"worker"}"# }
        defer { server.stop() }
        #expect(try exchange(.metadata, port: server.port).json == #"{"from":"worker"}"#)
    }

    @Test("an inline probe is answered while every worker is busy with a slow handler")
    func inlineProbeBesideBusyWorkers() throws {
        let server = try server(inline: .init(kinds: [.probe]) { _ in #"{"status":"success"}"# }) { message in
            if message.kind == .connection { usleep(1_500_000) }
            return "{}"
        }
        defer { server.stop() }
        let slow = try (0..<HandshakeServer.workers).map { _ in try send(.init(kind: .connection, json: "{}"), to: server.port) }
        defer { slow.forEach { $0.close() } }
        usleep(200_000)
        let started = Date()
        #expect(try exchange(.probe, port: server.port).json == #"{"status":"success"}"#)
        #expect(Date().timeIntervalSince(started) < 1.0, "the probe waited for a worker")
    }

    @Test("stop waits for an answer running on the I/O thread, so none is inside a plugin the engine unloads next")
    func stopWaitsForInlineAnswer() throws {
        let entered = Flag(), returned = Flag()
        let server = try server(inline: .init(kinds: [.metadata]) { _ in
            entered.set()
            usleep(400_000)
            returned.set()
            return "{}"
        }) { _ in "{}" }
        let socket = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { socket.close() }
        let deadline = Date().addingTimeInterval(5)
        while !entered.isSet && Date() < deadline { usleep(1000) }
        #expect(entered.isSet)
        server.stop()
        #expect(returned.isSet, "stop returned while the answer was still running")
    }

    /// Set once the server exists, so its own handler can stop it; and how long that stop took.
    final class ServerBox: @unchecked Sendable {
        private let lock = NSLock()
        private var value: HandshakeServer?
        private var took: TimeInterval?
        var server: HandshakeServer? {
            get { lock.withLock { value } }
            set { lock.withLock { value = newValue } }
        }
        var stopSeconds: TimeInterval? {
            get { lock.withLock { took } }
            set { lock.withLock { took = newValue } }
        }
    }

    @Test("stop called from inside a worker's handler (the engine released there) returns at once instead of waiting for itself")
    func stopFromWorkerHandler() throws {
        let box = ServerBox()
        let server = try server(inline: nil) { _ in
            let started = Date()
            box.server?.stop()
            box.stopSeconds = Date().timeIntervalSince(started)
            return "{}"
        }
        box.server = server
        defer { server.stop(); box.server = nil }  // on a failure below too (stop returns early once stopped)
        let socket = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { socket.close() }
        let deadline = Date().addingTimeInterval(10)
        while box.stopSeconds == nil && Date() < deadline { usleep(1000) }
        let seconds = try #require(box.stopSeconds, "the handler did not run")
        #expect(seconds < 2, "stop took \(seconds) s inside the handler (it waits up to 5 s)")
    }

    @Test("stop called from inside a worker's handler still waits for the other workers' handlers")
    func stopFromWorkerWaitsForOthers() throws {
        let box = ServerBox(), slowEntered = Flag(), slowReturned = Flag()
        let server = try server(inline: nil) { message in
            if message.kind == .connection {
                slowEntered.set()
                usleep(400_000)
                slowReturned.set()
            } else {
                box.server?.stop()
                box.stopSeconds = slowReturned.isSet ? 1 : 0  // 1: the slow handler had finished
            }
            return "{}"
        }
        box.server = server
        defer { server.stop(); box.server = nil }
        let slow = try send(.init(kind: .connection, json: "{}"), to: server.port)
        defer { slow.close() }
        let deadline = Date().addingTimeInterval(5)
        while !slowEntered.isSet && Date() < deadline { usleep(1000) }
        #expect(slowEntered.isSet)
        let stopper = try send(.init(kind: .metadata, json: "{}"), to: server.port)
        defer { stopper.close() }
        while box.stopSeconds == nil && Date() < deadline.addingTimeInterval(5) { usleep(1000) }
        #expect(box.stopSeconds == 1, "stop returned while another worker's handler was still running")
    }

    @Test("an engine answers descriptor fetches whole with few buffers (on the I/O thread) and with many (on a worker)")
    func engineDescriptorBothPaths() throws {
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        let buffers = (0..<70).map { _ in TestBuffer(4096) }
        let fetch = HandshakeWire.Message(kind: .metadata, json: "{}")
        for (count, buffer) in buffers.enumerated() {
            try engine.registerMemory(address: buffer.address, length: 4096)
            // The I/O thread answers up to 64 buffers; past that a worker does.
            if count == 63 { #expect(engine.answerHandshakeInline(fetch) != nil) }
            if count == 64 { #expect(engine.answerHandshakeInline(fetch) == nil) }
            guard count == 9 || count == 69 else { continue }
            let json = try JSONValue.parse(try exchange(.metadata, port: engine.rpcPort).json)
            let listed = Set((json["buffers"]?.arrayValue ?? []).compactMap { $0["addr"]?.uint64Value })
            #expect(listed == Set(buffers.prefix(count + 1).map(\.address)), "\(count + 1) registered")
        }
        try engine.unregisterMemory(address: buffers[3].address)
        let json = try JSONValue.parse(try exchange(.metadata, port: engine.rpcPort).json)
        #expect(json["buffers"]?.arrayValue?.count == 69)
    }
}
