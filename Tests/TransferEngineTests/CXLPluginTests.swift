import Foundation
import Testing
@testable import TransferEngine

enum CXLPluginBuild {
    static var present: Bool {
        FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent("libtransport_cxl.so").path)
            || ProcessInfo.processInfo.environment["TE_REQUIRE_CXL"] == "1"
    }
}

/// The cxl plugin with a shared file in /dev/shm standing in for a device-dax CXL pool: two real
/// processes map the same pool, allocate from its shared chunk table and copy through it.
@Suite("cxl plugin over a shared pool file", .serialized, .enabled(if: CXLPluginBuild.present, "libtransport_cxl.so was not built (install libcxl-dev libdaxctl-dev)"))
struct CXLPluginTests {
    private static func makePool(_ size: Int) throws -> String {
        let path = "/dev/shm/te-test-cxl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o600)
        guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw TestFailure("cannot create \(path)") }
        close(fd)
        return path
    }

    private func environment(pool: String?, strict: Bool = true) -> [String: String] {
        var settings = ["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path]
        if let pool { settings["MC_CXL_DEV_PATH"] = pool }
        if strict { settings["MC_STRICT_PROTOCOL"] = "1" }
        return TestSupport.cleanEnvironment(settings)
    }

    @Test("no device-dax pool and no MC_CXL_DEV_PATH: hardware absent with libdaxctl's and libcxl's answer, TCP with one warning")
    func hardwareAbsent() throws {
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl"), environment: environment(pool: nil, strict: false), logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "tcp")
        let warnings = capture.messages(at: .warning)
        #expect(warnings.count == 1, "\(warnings)")
        #expect(warnings.first?.contains("no device-dax pool (libdaxctl lists 0 dax devices)") == true, "\(warnings)")
        #expect(warnings.first?.contains("MC_CXL_DEV_PATH") == true)
    }

    @Test("two processes on one pool: managed buffers come from the shared chunk table, 1 B to 32 MiB verified, bounds")
    func sharedPool() throws {
        let pool = try Self.makePool(160 << 20)
        defer { unlink(pool) }
        let target = try ServeProcess(bufferSize: "64MiB", environment: environment(pool: pool), protocolName: "cxl")
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl"), environment: environment(pool: pool))
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "cxl")
        let source = try engine.allocateManagedBuffer(length: 40 << 20)
        defer { try? engine.freeManagedBuffer(address: source) }
        let sink = TestBuffer(40 << 20)  // heap memory works as the local side of a copy
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        let handle = try engine.openSegment(target.segment)
        let peer = try engine.descriptor(of: handle)
        // The two engines' allocations must not overlap inside the pool.
        let ours = engine.localDescriptor.buffers.first { $0.address == source }?.extra["cxl_offset"]?.uint64Value
        let theirs = peer.buffers.first?.extra["cxl_offset"]?.uint64Value
        #expect(ours != nil && theirs != nil)
        if let ours, let theirs { #expect(ours + (40 << 20) <= theirs || theirs + (64 << 20) <= ours, "pool ranges overlap: \(ours) / \(theirs)") }
        let pattern = UnsafeMutableRawPointer(bitPattern: UInt(source))!.assumingMemoryBound(to: UInt8.self)
        for (index, size) in [1, 7, 4095, 65537, 1 << 20, (4 << 20) + 3, 32 << 20].enumerated() {
            for i in 0..<size { pattern[i] = UInt8(truncatingIfNeeded: i &* 13 &+ index) }
            memset(sink.pointer, 0, size)
            let remote = target.bufferAddress + UInt64(index % 3) * 4097
            try engine.transferSync(.write, localAddress: source, segment: handle, remoteAddress: remote, length: UInt64(size))
            try engine.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: remote, length: UInt64(size))
            #expect(memcmp(sink.pointer, pattern, size) == 0, "size \(size)")
        }
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: source, segment: handle, remoteAddress: target.bufferAddress + target.bufferLength - 8, length: 64)
        }
    }

    @Test("a peer on another pool is reached over TCP; a killed process's chunks are reclaimed")
    func otherPoolAndReclaim() throws {
        let pool = try Self.makePool(80 << 20), other = try Self.makePool(80 << 20)
        defer { unlink(pool); unlink(other) }
        let target = try ServeProcess(bufferSize: "32MiB", environment: environment(pool: other), protocolName: "cxl")
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl"), environment: environment(pool: pool), logger: logger)
        defer { engine.shutdown() }
        let local = try engine.allocateManagedBuffer(length: 1 << 20)
        let handle = try engine.openSegment(target.segment)
        memset(UnsafeMutableRawPointer(bitPattern: UInt(local))!, 0x5a, 1 << 20)
        try engine.transferSync(.write, localAddress: local, segment: handle, remoteAddress: target.bufferAddress, length: 1 << 20)
        try engine.transferSync(.read, localAddress: local, segment: handle, remoteAddress: target.bufferAddress + 4096, length: 4096)
        #expect(UnsafeMutableRawPointer(bitPattern: UInt(local))!.load(as: UInt8.self) == 0x5a)
        #expect(capture.messages(at: .info).contains { $0.contains("cxl cannot reach") && $0.contains("using tcp") }, "\(capture.messages(at: .info))")
        try engine.freeManagedBuffer(address: local)

        // A process that dies holding chunks: the next engine that runs short takes them back.
        let holder = try ServeProcess(bufferSize: "60MiB", environment: environment(pool: pool), protocolName: "cxl")
        holder.kill()
        let big = try engine.allocateManagedBuffer(length: 70 << 20)
        try engine.freeManagedBuffer(address: big)
    }

    @Test("bench --local-heap --memcpy-reference measures its ceiling against a pool buffer; a pool too small for it stops the run")
    func benchCeilingOnPool() throws {
        let pool = try Self.makePool(32 << 20)
        defer { unlink(pool) }
        let json = try TestSupport.temporaryDirectory().appendingPathComponent("cxl-ceilings.json")
        let arguments = ["bench", "--loopback", "--protocol", "cxl", "--local-heap", "--memcpy-reference", "--no-reference",
                         "--buffer-size", "8MiB", "--batch-sizes", "1", "--duration", "0.05", "--json", json.path]
        let (status, out, err) = try TestSupport.run(TestSupport.cli, arguments + ["--block-sizes", "4KiB,1MiB"], environment: environment(pool: pool), timeout: 120)
        #expect(status == 0, "stderr: \(err.suffix(500))")
        #expect(out.contains("(protocol cxl)") && out.contains("memcpy x1 GB/s (ratio)"), "\(out)")
        let document = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
        #expect((document?["memcpy_copies_between"] as? String)?.contains("managed buffer") == true, "\(String(describing: document))")
        let ceilings = document?["memcpy_gbps_by_operation"] as? [String: [String: Double]] ?? [:]
        for op in ["write", "read"] {
            for block in ["4096", "1048576"] { #expect((ceilings[op]?[block] ?? 0) > 0, "\(op) \(block): \(ceilings)") }
        }
        // A target buffer of 30 MiB takes every chunk of the pool (32 MiB less its table's chunk), so
        // the ceiling's buffer cannot come from the pool; a heap figure would stand far above a
        // device's, so the run stops.
        let (refused, _, reason) = try TestSupport.run(TestSupport.cli, arguments + ["--block-sizes", "4KiB", "--buffer-size", "30MiB"],
                                                       environment: environment(pool: pool), timeout: 120)
        #expect(refused != 0 && reason.contains("needs a managed buffer"), "\(reason.suffix(500))")
    }
}

/// The cxl plugin on QEMU's emulated CXL type-3 device, turned into /dev/dax0.0 inside the guest
/// (scripts/vm/test-cxl.sh): discovery through libdaxctl, a device-dax mapping at its alignment.
@Suite("cxl plugin on an emulated CXL device (in the guest)", .serialized,
       .enabled(if: CXLPluginBuild.present && ProcessInfo.processInfo.environment["TE_CXL_GUEST"] == "1"))
struct CXLGuestTests {
    @Test("two processes on /dev/dax0.0 found by libdaxctl: 1 B to 8 MiB through the device, verified")
    func deviceDax() throws {
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path, "MC_STRICT_PROTOCOL": "1"])
        let target = try ServeProcess(bufferSize: "32MiB", environment: environment, protocolName: "cxl")
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl", deviceName: "auto-discovery"),
                                        environment: environment, logger: logger)
        defer { engine.shutdown() }
        let line = capture.messages(at: .info).first { $0.contains("cxl plugin: pool") } ?? ""
        #expect(line.contains("/dev/dax") && line.contains("2097152-byte alignment"), "\(line)")
        let source = try engine.allocateManagedBuffer(length: 16 << 20)
        let sink = TestBuffer(16 << 20)
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        let handle = try engine.openSegment(target.segment)
        let pattern = UnsafeMutableRawPointer(bitPattern: UInt(source))!.assumingMemoryBound(to: UInt8.self)
        for (index, size) in [1, 4096, 65537, 1 << 20, 8 << 20].enumerated() {
            for i in 0..<size { pattern[i] = UInt8(truncatingIfNeeded: i &* 7 &+ index) }
            memset(sink.pointer, 0, size)
            try engine.transferSync(.write, localAddress: source, segment: handle, remoteAddress: target.bufferAddress + UInt64(index), length: UInt64(size))
            try engine.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: target.bufferAddress + UInt64(index), length: UInt64(size))
            #expect(memcmp(sink.pointer, pattern, size) == 0, "size \(size)")
        }
        try engine.freeManagedBuffer(address: source)
    }
}
