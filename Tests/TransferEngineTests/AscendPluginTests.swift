import Foundation
import Testing
@testable import TransferEngine

/// The ascend plugin (Plugins/Ascend) without an NPU: CANN really missing, and a stand-in CANN
/// (Fixtures/standin_cann.c) that exports the entry points the plugin binds and reports no NPU,
/// lacks an entry point, or, with one "NPU" of host memory, moves bytes between processes.
@Suite("ascend plugin over a stand-in CANN", .serialized)
struct AscendPluginTests {
    static let plugin = TestSupport.productsDirectory.appendingPathComponent("libtransport_ascend.so").path

    /// Compiles the stand-in with `defines` into a fresh directory.
    static func standIn(_ defines: [String] = []) throws -> String {
        let directory = try TestSupport.temporaryDirectory("te-ascend")
        let output = directory.appendingPathComponent("libstandin_cann.so").path
        let source = TestSupport.repoRoot.appendingPathComponent("Tests/TransferEngineTests/Fixtures/standin_cann.c").path
        let state = directory.appendingPathComponent("servers").path
        let (status, _, stderr) = try TestSupport.run("/usr/bin/cc", ["-shared", "-fPIC", "-O1", "-Wall", "-DSTANDIN_DIR_DEFAULT=\"\(state)\""]
                                                      + defines.map { "-D\($0)" } + [source, "-o", output])
        guard status == 0 else { throw TestFailure("cc failed: \(stderr)") }
        return output
    }

    static func settings(_ library: String) -> [String: String] {
        ["MC_ASCEND_LIBRARY": library, "MC_ASCEND_ACL_LIBRARY": library, "MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path]
    }

    /// What `transfer-engine plugins --json` (a child process) says about the ascend plugin.
    private func listed(_ settings: [String: String]) throws -> (status: String, detail: String) {
        let (_, output, stderr) = try TestSupport.run(TestSupport.cli, ["plugins", "--json"], environment: TestSupport.cleanEnvironment(settings), timeout: 60)
        guard let data = output.data(using: .utf8), let document = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let list = document["plugins"] as? [[String: Any]],
              let entry = list.first(where: { $0["protocol"] as? String == "ascend" }) else {
            throw TestFailure("no ascend entry in plugins --json: \(output.suffix(400)) \(stderr.suffix(400))")
        }
        return (entry["status"] as? String ?? "", entry["detail"] as? String ?? "")
    }

    @Test("without CANN: library missing, naming the library and what to install")
    func cannMissing() throws {
        let plain = try listed(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path])
        #expect(plain.status == "library missing")
        #expect(plain.detail.contains("libascendcl.so") && plain.detail.contains("install the CANN toolkit"), "\(plain.detail)")
        let acl = try AscendPluginTests.standIn()
        let noHIXL = try listed(["MC_ASCEND_ACL_LIBRARY": acl, "MC_ASCEND_LIBRARY": "/nonexistent/libcann_hixl.so",
                                 "MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path])
        #expect(noHIXL.status == "library missing" && noHIXL.detail.contains("/nonexistent/libcann_hixl.so"), "\(noHIXL.detail)")
    }

    @Test("a CANN without HIXL's C API: library missing, naming the entry point it lacks")
    func cannTooOld() throws {
        let old = try listed(AscendPluginTests.settings(try AscendPluginTests.standIn(["STANDIN_OMIT_QUERY"])))
        #expect(old.status == "library missing")
        #expect(old.detail.contains("has no HixlCSClientQueryCompleteStatus") && old.detail.contains("CANN 8.5.0 or newer"), "\(old.detail)")
    }

    @Test("CANN without an NPU: hardware absent with the runtime's own error text; the checker skips what needs a device")
    func noDevice() throws {
        let library = try AscendPluginTests.standIn()
        let absent = try listed(AscendPluginTests.settings(library))
        #expect(absent.status == "hardware absent")
        #expect(absent.detail.contains("no NPU") && absent.detail.contains("EL0003: stand-in runtime: the driver reports no NPU device"), "\(absent.detail)")
        // The checker: what needs no device passes, the rest is skipped with the probe's reason.
        let (status, output, _) = try TestSupport.run(TestSupport.cli, ["plugins", "--check", AscendPluginTests.plugin],
                                                      environment: TestSupport.cleanEnvironment(AscendPluginTests.settings(library)), timeout: 300)
        #expect(status == 0 && output.contains("8 passed, 0 failed, 16 skipped"), "\(output.suffix(600))")
    }

    @Test("with one stand-in NPU the plugin passes every conformance check, none skipped")
    func checkerPasses() throws {
        let library = try AscendPluginTests.standIn(["STANDIN_NPUS_DEFAULT=1"])
        let (status, output, stderr) = try TestSupport.run(TestSupport.cli, ["plugins", "--check", AscendPluginTests.plugin],
                                                           environment: TestSupport.cleanEnvironment(AscendPluginTests.settings(library)), timeout: 400)
        #expect(status == 0 && output.contains("24 passed, 0 failed, 0 skipped"), "\(output.suffix(1500)) \(stderr.suffix(400))")
    }

    @Test("through a stand-in NPU: rank_info published in upstream's shape, managed npu:0 memory, bytes verified both ways, out-of-range refused")
    func dataPath() throws {
        let library = try AscendPluginTests.standIn(["STANDIN_NPUS_DEFAULT=1"])
        var environment = TestSupport.cleanEnvironment(AscendPluginTests.settings(library))
        environment["MC_STRICT_PROTOCOL"] = "1"
        let target = try ServeProcess(bufferSize: "8MiB", environment: environment, protocolName: "ascend")
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "ascend"), environment: environment)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "ascend")
        let handle = try engine.openSegment(target.segment)
        let peer = try engine.descriptor(of: handle)
        #expect(peer.protocolName == "ascend")
        guard case .object(let rank)? = peer.extra["rank_info"] else { Issue.record("no rank_info in \(peer.extra)"); return }
        #expect(rank["hostIp"]?.stringValue == "127.0.0.1" && rank["devicePhyId"]?.uint64Value == 0 && rank["endpoints"] != nil, "\(rank)")
        #expect(peer.buffers.first?.extra["ascend_mem"]?.stringValue == "host")

        // Managed npu:0 memory comes from the runtime's allocator (aclrtMalloc) and is registered.
        let managed = try engine.allocateManagedBuffer(length: 4 << 20, location: "npu:0")
        defer { try? engine.freeManagedBuffer(address: managed) }
        let source = TestBuffer(4 << 20)
        try engine.registerMemory(address: source.address, length: UInt64(source.count))
        for (index, size) in [1, 4095, 65537, 3 << 20].enumerated() {
            source.fillPattern(seed: UInt8(index + 3))
            let remote = target.bufferAddress + UInt64(index) * 4097
            try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: remote, length: UInt64(size))
            memset(UnsafeMutableRawPointer(bitPattern: UInt(managed))!, 0, size)
            try engine.transferSync(.read, localAddress: managed, segment: handle, remoteAddress: remote, length: UInt64(size))
            #expect(memcmp(UnsafeRawPointer(bitPattern: UInt(managed))!, source.pointer, size) == 0, "size \(size)")
        }
        // Out of the peer's buffer: refused, nothing moved.
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: target.bufferAddress + target.bufferLength - 8, length: 64)
        }
    }
}
