import Foundation
import Testing
@testable import TransferEngine
@testable import TransferEngineMetadataServer

/// The official Mooncake engine (PyPI wheel `mooncake-transfer-engine-non-cuda`)
/// and this engine read and write each other's segments over TCP/P2PHANDSHAKE.
///
/// Needs a Python that can `import mooncake.engine`: `TE_MOONCAKE_PYTHON`, else
/// `python3`. `.ci/run` installs the wheel and sets `TE_REQUIRE_INTEROP=1`, which
/// turns a missing wheel into a failure instead of a skip.
enum OfficialPeer {
    static let script = TestSupport.repoRoot.appendingPathComponent("Tests/TransferEngineTests/Interop/official_peer.py").path

    static let python: String? = {
        let candidates = [ProcessInfo.processInfo.environment["TE_MOONCAKE_PYTHON"], "/usr/bin/python3", "/usr/local/bin/python3"].compactMap { $0 }
        for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate) {
            if let (status, _, _) = try? TestSupport.run(candidate, ["-c", "import mooncake.engine"], timeout: 60), status == 0 { return candidate }
        }
        return nil
    }()

    static var required: Bool { ProcessInfo.processInfo.environment["TE_REQUIRE_INTEROP"] == "1" }
    static var enabled: Bool { python != nil || required }

    /// The byte pattern official_peer.py writes: byte i = (i * 131 + seed) mod 251.
    static func pattern(_ buffer: TestBuffer, seed: Int) {
        let p = buffer.pointer.assumingMemoryBound(to: UInt8.self)
        for i in 0..<buffer.count { p[i] = UInt8((i * 131 + seed) % 251) }
    }

    /// An official engine serving `size` bytes (official_peer.py target): the process, its
    /// stdin (for crc/quit commands), a reader of its stdout, and the READY line's segment and address.
    final class Target {
        let process = Process()
        let input = Pipe()
        let reader: LineReader
        let segment: String
        let address: UInt64

        init(python: String, size: Int, environment: [String: String]) throws {
            let output = Pipe()
            process.executableURL = URL(fileURLWithPath: python)
            process.arguments = [OfficialPeer.script, "target", String(size)]
            process.environment = environment
            process.standardInput = input
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            try process.run()
            reader = LineReader(output.fileHandleForReading)
            let ready = reader.line(timeout: 60) ?? ""
            let words = ready.split(separator: " ")
            guard words.count == 3, words[0] == "READY", let address = UInt64(words[2]) else {
                process.terminate()
                throw TestFailure("official target did not start: '\(ready)'")
            }
            segment = String(words[1])
            self.address = address
        }

        /// Sends one command line.
        func send(_ line: String) throws { try input.fileHandleForWriting.write(contentsOf: Data((line + "\n").utf8)) }

        deinit {
            try? send("quit")
            try? input.fileHandleForWriting.close()
            process.waitUntilExit()
        }
    }

    static func environment() -> [String: String] {
        var environment = TestSupport.cleanEnvironment()
        environment.removeValue(forKey: "MC_TRANSPORT_PLUGIN_PATH")
        environment["MC_FORCE_TCP"] = "1"
        environment["GLOG_minloglevel"] = "1"
        return environment
    }
}

/// zlib's CRC-32, to compare memory with the Python side.
func crc32(_ pointer: UnsafeRawPointer, count: Int) -> UInt32 {
    var table = [UInt32](repeating: 0, count: 256)
    for i in 0..<256 {
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        table[i] = c
    }
    var crc: UInt32 = 0xFFFF_FFFF
    let bytes = pointer.assumingMemoryBound(to: UInt8.self)
    for i in 0..<count { crc = table[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8) }
    return crc ^ 0xFFFF_FFFF
}

@Suite("Interop with the official Mooncake engine", .serialized, .enabled(if: OfficialPeer.enabled))
struct InteropTests {
    @Test("the official engine writes, reads, batches, probes and notifies our segment")
    func officialInitiator() throws {
        let python = try #require(OfficialPeer.python, "no Python with mooncake.engine (install mooncake-transfer-engine-non-cuda)")
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        let size = 4 << 20
        let buffer = TestBuffer(size, fill: 0)
        try engine.registerMemory(address: buffer.address, length: UInt64(size))
        let (status, out, err) = try TestSupport.run(python, [OfficialPeer.script, "initiator", engine.segmentName, String(buffer.address), String(size)],
                                                     environment: OfficialPeer.environment(), timeout: 120)
        #expect(status == 0, "stderr: \(err.suffix(2000))")
        let line = try #require(out.split(separator: "\n").last(where: { $0.hasPrefix("{") }), "no result line: \(out) \(err.suffix(2000))")
        let result = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(result["write"] as? Int == 0)
        #expect(result["read"] as? Int == 0)
        #expect(result["read_sha256"] as? String == result["expected_sha256"] as? String, "bytes read back differ")
        #expect(result["batch_write"] as? Int == 0)
        #expect(result["first_buffer"] as? UInt64 == buffer.address)
        #expect(result["probe"] as? Int == 0)
        #expect(result["notify"] as? Int == 0)
        #expect(result["out_of_range"] as? Int != 0, "a write past the registered buffer must fail")
        let expected = TestBuffer(size)
        OfficialPeer.pattern(expected, seed: 2)
        #expect(buffer.equals(expected, length: size), "our memory does not hold the official engine's bytes")
        #expect(engine.takeNotifications().contains(TransferNotification(name: "interop", message: "hello from the official engine")))
    }

    @Test("our engine reads and writes an official segment, with v2 and with v1 framing", arguments: ["2", "1"])
    func officialTarget(framing: String) throws {
        let python = try #require(OfficialPeer.python)
        let size = 8 << 20
        let official = try OfficialPeer.Target(python: python, size: size, environment: OfficialPeer.environment())
        let segment = official.segment
        let remote = official.address

        var environment = TestSupport.cleanEnvironment()
        if framing == "1" { environment["MC_TCP_PROTO"] = "1" }
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: environment)
        defer { engine.shutdown() }
        let local = TestBuffer(size), back = TestBuffer(size), expected = TestBuffer(size)
        try engine.registerMemory(address: local.address, length: UInt64(size))
        try engine.registerMemory(address: back.address, length: UInt64(size))
        let handle = try engine.openSegment(segment)
        let descriptor = try engine.descriptor(of: handle)
        // The official allocator hands out slices of a larger registered slab.
        #expect(descriptor.protocolName == "tcp" && descriptor.buffer(containing: remote, length: UInt64(size)) != nil)
        #expect(descriptor.tcpProtocolVersion == 2)

        // Read the official engine's initial bytes.
        try engine.transferSync(.read, localAddress: back.address, segment: handle, remoteAddress: remote, length: UInt64(size))
        OfficialPeer.pattern(expected, seed: 1)
        #expect(back.equals(expected, length: size))

        // Write a new pattern in a batch of 64 KiB requests, then check it in the official process.
        local.fillPattern(seed: 77)
        let block: UInt64 = 64 << 10
        try engine.transferBatchSync((0..<(size / Int(block))).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) * block, segment: handle,
                            remoteAddress: remote + UInt64(i) * block, length: block)
        })
        // v1 writes complete when sent (no acknowledgement, as upstream): allow the target a moment.
        let ours = String(crc32(local.pointer, count: size))
        var theirs = ""
        for _ in 0..<(framing == "1" ? 50 : 1) {
            try official.send("crc \(remote) \(size)")
            theirs = try #require(official.reader.line(timeout: 30))
            if theirs == ours { break }
            usleep(100_000)
        }
        #expect(theirs == ours, "official target memory differs after our writes")

        // Sizes that are not multiples of anything, unaligned offsets, read back.
        for (offset, length) in [(1, 1), (4095, 4097), (123_457, 1_000_003)] {
            try engine.transferSync(.read, localAddress: back.address, segment: handle, remoteAddress: remote + UInt64(offset), length: UInt64(length))
            #expect(back.equals(local, offset: 0, otherOffset: offset, length: length))
        }
    }
}

@Suite("Interop with the official engine through a shared metadata server", .serialized, .enabled(if: OfficialPeer.enabled))
struct SharedMetadataInteropTests {
    @Test("official and Swift engines find each other through a shared metadata server, in both directions",
          arguments: ["http", "etcd"])
    func throughSharedMetadata(backend: String) throws {
        let python = try #require(OfficialPeer.python)
        var httpServer: MetadataHTTPServer?
        var etcd: EtcdProcess?
        defer { httpServer?.stop(); etcd?.kill() }
        let url: String
        if backend == "http" {
            httpServer = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
            url = "http://127.0.0.1:\(httpServer!.port)/metadata"
        } else {
            guard EtcdProcess.binary != nil else {
                // scripts/test.sh installs etcd-server where it can; CI must have it.
                if ProcessInfo.processInfo.environment["CI"] != nil { Issue.record("etcd is not installed") }
                return
            }
            etcd = try EtcdProcess()
            url = "etcd://127.0.0.1:\(etcd!.port)"
        }
        var officialEnvironment = OfficialPeer.environment()
        officialEnvironment["TE_INTEROP_METADATA"] = url
        officialEnvironment["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"

        // Our engine as the target; the official engine opens it by name through the server.
        let ours = try TransferEngine(configuration: EngineConfiguration(localHostname: "swift-node", metadataServer: url),
                                      environment: TestSupport.cleanEnvironment(["MC_TCP_BIND_ADDRESS": "127.0.0.1"]))
        defer { ours.shutdown() }
        let size = 4 << 20
        let buffer = TestBuffer(size)
        try ours.registerMemory(address: buffer.address, length: UInt64(size))
        officialEnvironment["TE_INTEROP_NAME"] = "official-initiator"
        let (status, out, err) = try TestSupport.run(python, [OfficialPeer.script, "initiator", "swift-node", String(buffer.address), String(size)],
                                                     environment: officialEnvironment, timeout: 120)
        #expect(status == 0, "\(err.suffix(2000))")
        let line = try #require(out.split(separator: "\n").last(where: { $0.hasPrefix("{") }), "\(out) \(err.suffix(2000))")
        let result = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(result["write"] as? Int == 0 && result["read"] as? Int == 0 && result["batch_write"] as? Int == 0)
        #expect(result["read_sha256"] as? String == result["expected_sha256"] as? String)
        let expected = TestBuffer(size)
        OfficialPeer.pattern(expected, seed: 2)
        #expect(buffer.equals(expected, length: size))

        // The official engine as the target; ours opens it by name.
        officialEnvironment["TE_INTEROP_NAME"] = "official-target"
        let official = try OfficialPeer.Target(python: python, size: size, environment: officialEnvironment)
        #expect(official.segment == "official-target")
        let remote = official.address
        let local = TestBuffer(size)
        try ours.registerMemory(address: local.address, length: UInt64(size))
        let handle = try ours.openSegment("official-target")
        try ours.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: remote, length: UInt64(size))
        OfficialPeer.pattern(expected, seed: 1)
        #expect(local.equals(expected, length: size))
    }
}

/// Reads lines from a pipe with a deadline.
final class LineReader: @unchecked Sendable {
    private let handle: FileHandle
    private var buffer = Data()
    init(_ handle: FileHandle) { self.handle = handle }

    func line(timeout: TimeInterval) -> String? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex...newline)
                return line
            }
            let chunk = handle.availableData
            if chunk.isEmpty { return nil }
            buffer.append(chunk)
        }
        return nil
    }
}
