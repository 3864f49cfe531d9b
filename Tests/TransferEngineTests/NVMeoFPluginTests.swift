import Foundation
import Testing
@testable import TransferEngine

enum NVMeoFPluginBuild {
    static var present: Bool {
        FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent("libtransport_nvmeof.so").path)
            || ProcessInfo.processInfo.environment["TE_REQUIRE_NVMEOF"] == "1"
    }

    static func environment(_ settings: [String: String] = [:], strict: Bool = true) -> [String: String] {
        var all = ["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path]
        if strict { all["MC_STRICT_PROTOCOL"] = "1" }
        all.merge(settings) { $1 }
        return TestSupport.cleanEnvironment(all)
    }

    /// The storage range a segment publishes (a buffer whose protocol is nvmeof).
    static func storage(_ descriptor: SegmentDescriptor) -> SegmentDescriptor.Buffer? {
        descriptor.buffers.first { $0.extra["protocol"]?.stringValue == "nvmeof" }
    }

    /// Writes then reads each size at odd offsets of the peer's storage range, checking the bytes
    /// and (when given) the backing file itself.
    static func roundTrips(_ engine: TransferEngine, _ handle: SegmentHandle, base: UInt64, sizes: [Int], file: String?) throws {
        let largest = sizes.max()!
        let source = TestBuffer(largest), sink = TestBuffer(largest)
        try engine.registerMemory(address: source.address, length: UInt64(largest))
        try engine.registerMemory(address: sink.address, length: UInt64(largest))
        defer {
            try? engine.unregisterMemory(address: source.address)
            try? engine.unregisterMemory(address: sink.address)
        }
        let fd = file.map { open($0, O_RDONLY) } ?? -1
        defer { if fd >= 0 { close(fd) } }
        for (index, size) in sizes.enumerated() {
            for i in 0..<size { source.bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ index &+ 1) }
            memset(sink.pointer, 0, size)
            let offset = UInt64(index) * 4099 % 65536  // unaligned offsets, partial first and last blocks
            try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: base + offset, length: UInt64(size))
            try engine.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: base + offset, length: UInt64(size))
            #expect(memcmp(sink.pointer, source.pointer, size) == 0, "size \(size) at offset \(offset)")
            if fd >= 0 {
                var onDisk = [UInt8](repeating: 0, count: size)
                #expect(pread(fd, &onDisk, size, off_t(offset)) == size)
                #expect(memcmp(onDisk, source.pointer, size) == 0, "file contents, size \(size)")
            }
        }
    }
}

/// The nvmeof plugin with a file on the host standing in for a namespace: two real processes,
/// the owner serving the file, the peer reaching it directly (same host) or through the owner.
@Suite("nvmeof plugin over a file-backed namespace", .serialized,
       .enabled(if: NVMeoFPluginBuild.present, "libtransport_nvmeof.so was not built (install libnvme-dev)"))
struct NVMeoFPluginTests {
    private static func makeNamespace(_ size: Int) throws -> String {
        let path = NSTemporaryDirectory() + "te-test-nvmeof-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o600)
        guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw TestFailure("cannot create \(path)") }
        close(fd)
        return path
    }

    @Test("an unreachable NVMe-oF target, a missing path or a malformed option: hardware absent, TCP with one warning; strict mode refuses")
    func targetAbsent() throws {
        let cases: [(String, String)] = [
            ("tcp://127.0.0.1:4420/nqn.2026-11.io.test:absent", "/dev/nvme-fabrics"),
            ("/nonexistent/kv.img", "/nonexistent/kv.img: No such file or directory"),
            ("nvme://127.0.0.1/x", "unknown NVMe-oF transport 'nvme'"),
        ]
        for (namespaces, expected) in cases {
            let (logger, capture) = TestSupport.capturingLogger()
            let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"),
                                            environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_NAMESPACES": namespaces], strict: false), logger: logger)
            defer { engine.shutdown() }
            #expect(engine.activeProtocol == "tcp")
            let warnings = capture.messages(at: .warning)
            #expect(warnings.count == 1 && warnings[0].contains(expected), "\(namespaces): \(warnings)")
            #expect(throws: EngineError.self) {
                try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"),
                                   environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_NAMESPACES": namespaces]))
            }
        }
    }

    @Test("same host: the peer opens the owner's file itself (O_DIRECT), 1 B to 32 MiB at unaligned offsets verified in the file; bounds; owner memory over TCP")
    func directSameHost() throws {
        let file = try Self.makeNamespace(64 << 20)
        defer { unlink(file) }
        let owner = try ServeProcess(bufferSize: "4MiB", environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_NAMESPACES": file]), protocolName: "nvmeof")
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"), environment: NVMeoFPluginBuild.environment(), logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "nvmeof")
        let handle = try engine.openSegment(owner.segment)
        let peer = try engine.descriptor(of: handle)
        let range = try #require(NVMeoFPluginBuild.storage(peer))
        #expect(range.length == 64 << 20 && range.address == 1 << 62)
        #expect(range.extra["file_path"]?.stringValue == file)
        try NVMeoFPluginBuild.roundTrips(engine, handle, base: range.address,
                                         sizes: [1, 511, 4096, 4097, 65537, 1 << 20, (4 << 20) + 3, 32 << 20], file: file)
        #expect(capture.messages(at: .info).contains { $0.contains("directly via \(file)") }, "\(capture.messages(at: .info))")
        // Past the end of the namespace: refused before anything moves.
        let buffer = TestBuffer(8192)
        try engine.registerMemory(address: buffer.address, length: 8192)
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: buffer.address, segment: handle, remoteAddress: range.address + range.length - 100, length: 8192)
        }
        // The owner's registered memory is published with protocol tcp and served by TCP.
        memset(buffer.pointer, 0x3c, 8192)
        try engine.transferSync(.write, localAddress: buffer.address, segment: handle, remoteAddress: owner.bufferAddress, length: 8192)
        memset(buffer.pointer, 0, 8192)
        try engine.transferSync(.read, localAddress: buffer.address, segment: handle, remoteAddress: owner.bufferAddress + 4096, length: 4096)
        #expect(buffer.bytes[0] == 0x3c && buffer.bytes[4095] == 0x3c)
    }

    @Test("through the owner (MC_NVMEOF_DIRECT=0): relayed chunks verified in the file; concurrent batches; owner killed mid-batch fails every task")
    func relayThroughOwner() throws {
        let file = try Self.makeNamespace(16 << 20)
        defer { unlink(file) }
        let owner = try ServeProcess(bufferSize: "1MiB", environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_NAMESPACES": file]), protocolName: "nvmeof")
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"),
                                        environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_DIRECT": "0"]), logger: logger)
        defer { engine.shutdown() }
        let handle = try engine.openSegment(owner.segment)
        let range = try #require(NVMeoFPluginBuild.storage(try engine.descriptor(of: handle)))
        try NVMeoFPluginBuild.roundTrips(engine, handle, base: range.address, sizes: [1, 4097, 262_144, (1 << 20) + 3], file: file)
        #expect(!capture.messages(at: .info).contains { $0.contains("directly via") })

        // Four threads, each a batch of 16 pieces of 64 KiB + 1 into its own quarter.
        let piece = 65_537, perThread = 16
        let source = TestBuffer(piece * perThread * 4), sink = TestBuffer(piece * perThread * 4)
        for i in 0..<source.count { source.bytes[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        try engine.registerMemory(address: source.address, length: UInt64(source.count))
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { thread in
            for operation in [TransferRequest.Operation.write, .read] {
                let requests = (0..<perThread).map { k -> TransferRequest in
                    let at = UInt64((thread * perThread + k) * piece)
                    return TransferRequest(operation: operation, localAddress: (operation == .write ? source.address : sink.address) + at,
                                           segment: handle, remoteAddress: range.address + at, length: UInt64(piece))
                }
                do { try engine.transferBatchSync(requests) } catch { failures.increment() }
            }
        }
        #expect(failures.value == 0)
        #expect(memcmp(source.pointer, sink.pointer, source.count) == 0)

        // The owner dies: relayed requests fail, none hangs.
        owner.kill()
        let batch = try engine.allocateBatch(capacity: 8)
        let started = Date()
        try engine.submit((0..<8).map { k in
            TransferRequest(operation: .write, localAddress: source.address, segment: handle, remoteAddress: range.address + UInt64(k) * 65_536, length: 65_536)
        }, to: batch)
        #expect(try engine.wait(batch: batch, timeoutNs: 30_000_000_000))
        #expect(try engine.statuses(batch: batch).allSatisfy { $0.state == .failed })
        #expect(Date().timeIntervalSince(started) < 30)
        try engine.freeBatch(batch)
    }
}

/// The nvmeof plugin on real kernel NVMe-oF targets inside the soft-RoCE guest (scripts/vm/test-nvmeof.sh
/// creates an nvmet subsystem on NVMe/TCP and one on NVMe/RDMA over rxe0): libnvme connect by URI and
/// by discovery, the namespace found in sysfs, direct I/O and the relay, disconnect at close.
@Suite("nvmeof plugin on kernel NVMe-oF targets (in the guest)", .serialized,
       .enabled(if: NVMeoFPluginBuild.present && ProcessInfo.processInfo.environment["TE_NVMEOF_GUEST"] == "1"))
struct NVMeoFGuestTests {
    private let settings = ProcessInfo.processInfo.environment

    /// Whether the kernel lists a controller of subsystem `nqn`.
    private static func connected(_ nqn: String) -> Bool {
        let root = "/sys/class/nvme-subsystem"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.contains { name in
            (try? String(contentsOfFile: "\(root)/\(name)/subsysnqn", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == nqn
                && ((try? FileManager.default.contentsOfDirectory(atPath: "\(root)/\(name)"))?.contains { $0.hasPrefix("nvme") && !$0.contains("c") } ?? false)
        }
    }

    private func exercise(owner settings: [String: String], nqn: String, file: String) throws {
        #expect(!Self.connected(nqn), "\(nqn) connected before the owner started")
        let owner = try ServeProcess(bufferSize: "1MiB", environment: NVMeoFPluginBuild.environment(settings), protocolName: "nvmeof")
        #expect(Self.connected(nqn), "the owner did not connect \(nqn)")
        do {
            let (logger, capture) = TestSupport.capturingLogger()
            let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"), environment: NVMeoFPluginBuild.environment(), logger: logger)
            defer { engine.shutdown() }
            let handle = try engine.openSegment(owner.segment)
            let range = try #require(NVMeoFPluginBuild.storage(try engine.descriptor(of: handle)))
            let subsystem = range.extra["nvmeof_subsystem"]?.objectValue
            #expect(subsystem?["nqn"]?.stringValue == nqn, "\(range.extra)")
            try NVMeoFPluginBuild.roundTrips(engine, handle, base: range.address, sizes: [1, 4097, 65_537, 1 << 20, (8 << 20) + 3], file: file)
            #expect(capture.messages(at: .info).contains { $0.contains("directly via /dev/nvme") }, "\(capture.messages(at: .info))")
        }
        do {
            let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "nvmeof"),
                                            environment: NVMeoFPluginBuild.environment(["MC_NVMEOF_DIRECT": "0"]))
            defer { engine.shutdown() }
            let handle = try engine.openSegment(owner.segment)
            let range = try #require(NVMeoFPluginBuild.storage(try engine.descriptor(of: handle)))
            try NVMeoFPluginBuild.roundTrips(engine, handle, base: range.address + (64 << 20), sizes: [3, 4096, (1 << 20) + 5], file: nil)
        }
        // Closing the owner disconnects the controller it connected.
        try? owner.input.fileHandleForWriting.close()
        owner.process.waitUntilExit()
        let deadline = Date().addingTimeInterval(10)
        while Self.connected(nqn) && Date() < deadline { usleep(100_000) }
        #expect(!Self.connected(nqn), "\(nqn) still connected after the owner exited")
    }

    @Test("NVMe/TCP subsystem by URI: libnvme connect, 1 B to 8 MiB direct and relayed, verified in the target's backing file, disconnect at close")
    func tcpByURI() throws {
        let uri = try #require(settings["TE_NVMEOF_TCP"])
        try exercise(owner: ["MC_NVMEOF_NAMESPACES": uri], nqn: String(uri.split(separator: "/").last!), file: try #require(settings["TE_NVMEOF_TCP_FILE"]))
    }

    @Test("NVMe/RDMA over rxe by discovery: the discovery log's subsystem connected, data verified, disconnect at close")
    func rdmaByDiscovery() throws {
        let discovery = try #require(settings["TE_NVMEOF_RDMA_DISCOVERY"])
        try exercise(owner: ["MC_NVMEOF_DISCOVERY": discovery], nqn: "nqn.2026-11.io.test:rdma", file: try #require(settings["TE_NVMEOF_RDMA_FILE"]))
    }
}
