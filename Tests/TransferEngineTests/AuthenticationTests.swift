import Foundation
import Testing
@testable import TransferEngine

/// Opt-in shared-secret authentication (MC_AUTH_SECRET): engines that share the secret work as
/// before; a peer without it gets no descriptor, no answer and no byte of memory, on the handshake
/// port and on the data port alike, in both directions.
@Suite("Peer authentication with a shared secret", .serialized)
struct AuthenticationTests {
    static let secret = "correct horse battery staple"

    private func engine(secret: String?, _ extra: [String: String] = [:]) throws -> TransferEngine {
        var settings = extra
        if let secret { settings["MC_AUTH_SECRET"] = secret }
        return try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment(settings))
    }

    @Test("same secret: open, sync and batched transfers, probe and notify work")
    func sameSecret() throws {
        let target = try engine(secret: Self.secret), initiator = try engine(secret: Self.secret)
        defer { initiator.shutdown(); target.shutdown() }
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        local.fillPattern(seed: 4)
        try target.registerMemory(address: remote.address, length: 1 << 20)
        try initiator.registerMemory(address: local.address, length: 1 << 20)
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        try initiator.transferBatchSync((0..<16).map {
            TransferRequest(operation: .write, localAddress: local.address + UInt64($0) * 65536, segment: handle,
                            remoteAddress: remote.address + UInt64($0) * 65536, length: 65536)
        })
        #expect(remote.equals(local, length: 1 << 20))
        try initiator.probe(segmentName: target.segmentName)
        try initiator.sendNotification(TransferNotification(name: "n", message: "m"), to: handle)
        #expect(target.takeNotifications() == [TransferNotification(name: "n", message: "m")])
    }

    @Test("a missing or different secret on either side is refused with a reason; nothing is served")
    func mismatches() throws {
        for (targetSecret, initiatorSecret, reason) in [(Self.secret, nil, "segment"), (nil, Self.secret, "does it have authentication on"),
                                                         (Self.secret, "another secret of enough length", "refused our authentication")] {
            // A target without authentication waits for a request the initiator never sends: the
            // initiator gives up after its connect timeout (1 s here).
            // A secured target waits as long for a response shorter than one (1 s frame deadline here).
            let target = try engine(secret: targetSecret, ["MC_HANDSHAKE_FRAME_TIMEOUT_MS": "1000"])
            let initiator = try engine(secret: initiatorSecret, ["MC_HANDSHAKE_CONNECT_TIMEOUT": "1"])
            defer { initiator.shutdown(); target.shutdown() }
            let error = #expect(throws: EngineError.self) { _ = try initiator.openSegment(target.segmentName) }
            #expect("\(error.map { "\($0)" } ?? "")".contains(reason), "\(String(describing: error))")
            #expect(throws: EngineError.self) { try initiator.probe(segmentName: target.segmentName) }
        }
    }

    @Test("raw clients of a secured engine: an official-style Metadata request gets only the challenge; a data-port read gets no memory")
    func rawClients() throws {
        let target = try engine(secret: Self.secret)
        defer { target.shutdown() }
        let buffer = TestBuffer(4096, fill: 0x5A)
        try target.registerMemory(address: buffer.address, length: 4096)
        func exchange(port: UInt16, _ bytes: [UInt8]) throws -> [UInt8] {
            let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
            defer { socket.close() }
            socket.setTimeouts(receiveMs: 8000, sendMs: 2000)
            try bytes.withUnsafeBytes { try socket.sendAll([$0]) }
            var reply: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 4096)
            while let n = try? chunk.withUnsafeMutableBytes({ try socket.receiveSome($0.baseAddress!, count: $0.count) }), n > 0 { reply += chunk[0..<n] }
            return reply
        }
        let metadata = HandshakeWire.Message(kind: .metadata, json: #"{"name":"x"}"#).encoded + [UInt8](repeating: 0x20, count: 64)
        let handshakeReply = try exchange(port: target.rpcPort, metadata)
        #expect(handshakeReply.count == PeerAuthenticator.challengeSize && Array(handshakeReply.prefix(4)) == Array("MCAU".utf8), "\(handshakeReply.count) bytes")
        let read = TCPWire.Header(size: 4096, address: buffer.address, operation: .read, acknowledged: true).bytes + [UInt8](repeating: 0, count: 40)
        let dataReply = try exchange(port: target.dataPort, read)
        #expect(dataReply.count == PeerAuthenticator.challengeSize, "\(dataReply.count) bytes came back")
        // Only the challenge (magic + random nonce) came back: a single 0x5A byte may be in the
        // nonce by chance (about one run in eight), eight of the buffer's in a row never are.
        #expect(Array(dataReply.prefix(4)) == Array("MCAU".utf8))
        #expect(!(0...(max(0, dataReply.count - 8))).contains { dataReply.count >= 8 && dataReply[$0..<($0 + 8)].allSatisfy { $0 == 0x5A } })
    }

    @Test("the secret comes from MC_AUTH_SECRET_FILE or the config file; a short one is refused")
    func secretSources() throws {
        let directory = try TestSupport.temporaryDirectory("te-auth")
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("secret")
        try (Self.secret + "\n").write(to: file, atomically: true, encoding: .utf8)
        let fromFile = try engine(secret: nil, ["MC_AUTH_SECRET_FILE": file.path])
        let fromEnvironment = try engine(secret: Self.secret)
        defer { fromFile.shutdown(); fromEnvironment.shutdown() }
        try fromFile.probe(segmentName: fromEnvironment.segmentName)
        var configuration = EngineConfiguration()
        configuration.authSecret = Self.secret
        let fromConfig = try TransferEngine(configuration: configuration, environment: TestSupport.cleanEnvironment())
        defer { fromConfig.shutdown() }
        try fromConfig.probe(segmentName: fromEnvironment.segmentName)
        #expect(throws: EngineError.self) { _ = try engine(secret: "short") }
        #expect(throws: EngineError.self) { _ = try engine(secret: nil, ["MC_AUTH_SECRET_FILE": "/nonexistent/secret"]) }
    }
}
