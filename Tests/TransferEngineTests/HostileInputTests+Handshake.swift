import Foundation
import Testing
@testable import TransferEngine

/// The handshake port under hostile input: floods, trickling and malformed frames, and the
/// descriptor its Metadata reply carries (part of the hostile-input suite).
extension HostileInputTests {
    @Test("the handshake port answers a probe within a second while 300 idle and 8 trickling connections are open; limits evict the oldest")
    func handshakeFlood() throws {
        let engine = try TransferEngine(configuration: EngineConfiguration(),
                                        environment: TestSupport.cleanEnvironment(["MC_HANDSHAKE_MAX_PER_ADDRESS": "1000",
                                                                                   "MC_HANDSHAKE_FRAME_TIMEOUT_MS": "3000"]))
        defer { engine.shutdown() }
        let port = engine.rpcPort
        var idle: [Socket] = []
        for _ in 0..<300 { idle.append(try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)) }
        // Tricklers: a 1000-byte request announced, then one byte at a time (the workers' old trap).
        var tricklers: [Socket] = []
        for _ in 0..<8 {
            let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
            var length: UInt64 = 1000
            try socket.sendAll(&length, count: 8)
            tricklers.append(socket)
        }
        var slowest = 0.0
        for round in 0..<10 {
            for socket in tricklers { var byte: UInt8 = 0x7B; try? socket.sendAll(&byte, count: 1) }
            let started = Date()
            try engine.probe(segmentName: engine.segmentName)
            slowest = max(slowest, Date().timeIntervalSince(started))
            if round % 3 == 0 { usleep(50_000) }
        }
        print("handshake flood: slowest probe \(Int(slowest * 1e6)) us with 300 idle and 8 trickling connections")
        #expect(slowest < 1.0)
        // The frame deadline (3 s here) closes the tricklers: they read EOF.
        tricklers[0].setTimeouts(receiveMs: 6000, sendMs: 1000)
        var byte: UInt8 = 0
        #expect((try? tricklers[0].receiveSome(&byte, count: 1)) == 0)

        // A per-address limit of 16: forty idle connections from one address, and a probe from
        // the same address still gets through (the oldest idle one makes room).
        let strict = try TransferEngine(configuration: EngineConfiguration(),
                                        environment: TestSupport.cleanEnvironment(["MC_HANDSHAKE_MAX_PER_ADDRESS": "16"]))
        defer { strict.shutdown() }
        var crowd: [Socket] = []
        for _ in 0..<40 { crowd.append(try Socket.connect(host: "127.0.0.1", port: strict.rpcPort, timeoutMs: 2000)) }
        try strict.probe(segmentName: strict.segmentName)
        crowd[0].setTimeouts(receiveMs: 3000, sendMs: 1000)
        #expect((try? crowd[0].receiveSome(&byte, count: 1)) == 0, "the oldest idle connection was not closed")
        _ = idle
    }

    @Test("malformed handshakes are dropped and the handshake port keeps answering")
    func malformedHandshakes() throws {
        let target = try Target()
        let port = target.engine.rpcPort
        let attempts: [[UInt8]] = [
            [0, 0, 0, 0, 0, 0, 0, 0],                                      // length 0
            withUnsafeBytes(of: UInt64(1 << 40)) { Array($0) },            // absurd length
            withUnsafeBytes(of: UInt64(10)) { Array($0) } + [1, 0x7B],     // truncated body
            withUnsafeBytes(of: UInt64(3)) { Array($0) } + [2, 0xC3, 0x28], // invalid UTF-8
            withUnsafeBytes(of: UInt64(6)) { Array($0) } + [2] + Array("nope!".utf8),  // notify with bad JSON
            Array("GET / HTTP/1.1\r\n\r\n".utf8),                           // wrong protocol entirely
        ]
        for bytes in attempts {
            let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
            socket.setTimeouts(receiveMs: 7000, sendMs: 2000)
            try bytes.withUnsafeBytes { try socket.sendAll([$0]) }
            socket.shutdownWrite()
            var scratch = [UInt8](repeating: 0, count: 64)
            let n = (try? scratch.withUnsafeMutableBytes { try socket.receiveSome($0.baseAddress!, count: 64) }) ?? 0
            #expect(n == 0, "server answered a malformed handshake: \(Array(scratch.prefix(n)))")
            socket.close()
        }
        #expect(target.engine.takeNotifications().isEmpty)
        let probe = try HandshakeClient.exchange(host: "127.0.0.1", port: port, message: .init(kind: .probe, json: "{}"),
                                                 timeouts: .init(connectMs: 2000, replyMs: 5000))
        #expect(probe.json == #"{"status":"success"}"#)
        #expect(target.untouched)
    }

    @Test("the Metadata reply is the descriptor an official peer expects")
    func metadataReply() throws {
        let target = try Target()
        let reply = try HandshakeClient.exchange(host: "127.0.0.1", port: target.engine.rpcPort,
                                                 message: .init(kind: .metadata, json: #"{"name":"peer","protocol":"tcp"}"#),
                                                 timeouts: .init(connectMs: 2000, replyMs: 5000))
        let json = try JSONValue.parse(reply.json)
        #expect(json["name"]?.stringValue == target.engine.segmentName)
        #expect(json["protocol"]?.stringValue == "tcp")
        #expect(json["tcp_data_port"]?.uint64Value == UInt64(target.engine.dataPort))
        #expect(json["tcp_proto_version"]?.uint64Value == 2)
        let buffer = json["buffers"]?.arrayValue?.first
        #expect(buffer?["addr"]?.uint64Value == target.buffer.address)
        #expect(buffer?["length"]?.uint64Value == UInt64(target.buffer.count))
        #expect(buffer?["name"]?.stringValue == target.engine.segmentName)
        // A legacy (untyped) Connection message is answered in the legacy form.
        let legacy = try HandshakeClient.exchange(host: "127.0.0.1", port: target.engine.rpcPort,
                                                  message: .init(kind: .connection, json: #"{"local_nic_path":"x"}"#, legacy: true),
                                                  timeouts: .init(connectMs: 2000, replyMs: 5000))
        #expect(legacy.legacy && legacy.json.contains("reply_msg"))
    }
}
