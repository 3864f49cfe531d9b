import CTransportABI
import Foundation
import Testing
@testable import TransferEngine

/// The plugin ABI, discovery and fallback, over real `.so` files built from
/// Fixtures/fixture_plugin.c with the system C compiler.
@Suite("Plugin ABI and protocol selection", .serialized)
struct PluginTests {
    @Test("a complete plugin loads and reports its descriptor")
    func loadsGoodPlugin() throws {
        let directory = try TestSupport.temporaryDirectory()
        let path = try FixturePlugins.build("libtransport_loopcopy.so", in: directory)
        let plugin = try PluginLoader.load(path: path).get()
        #expect(plugin.info.name == "fixture" && plugin.info.version == "9.9.9" && plugin.info.protocols == ["loopcopy"])
        #expect(plugin.info.abiVersion == "\(TE_ABI_MAJOR).\(TE_ABI_MINOR)")
        #expect(plugin.info.capabilities & TE_CAP_OP_WRITE != 0)
        #expect(plugin.probe(optionsJSON: "{}").available)
    }

    @Test("a newer plugin with a larger descriptor is accepted")
    func acceptsNewerMinor() throws {
        let directory = try TestSupport.temporaryDirectory()
        let path = try FixturePlugins.build("libtransport_newer.so", defines: ["FIXTURE_NEWER"], in: directory)
        let plugin = try PluginLoader.load(path: path).get()
        #expect(plugin.info.abiVersion == "\(TE_ABI_MAJOR).\(TE_ABI_MINOR + 1)")
        #expect(plugin.info.descriptorSize > MemoryLayout<te_plugin_descriptor>.size)
    }

    @Test("wrong major, short descriptor, missing symbol and missing dependency are refused with reasons")
    func refusesBrokenPlugins() throws {
        let directory = try TestSupport.temporaryDirectory()
        let cases: [(String, String)] = [
            (try FixturePlugins.build("libtransport_badmajor.so", defines: ["FIXTURE_BAD_MAJOR"], in: directory), "ABI major version 99"),
            (try FixturePlugins.build("libtransport_small.so", defines: ["FIXTURE_SMALL"], in: directory), "smaller than the ABI 1.0 minimum"),
            (try FixturePlugins.build("libtransport_noentry.so", defines: ["FIXTURE_NO_ENTRY"], in: directory), "does not export 'te_transport_plugin_entry'"),
            (try FixturePlugins.buildWithMissingDependency("libtransport_needslib.so", in: directory), "the needslib plugin needs libfixturedep.so.1"),
        ]
        for (path, expected) in cases {
            switch PluginLoader.load(path: path) {
            case .success: Issue.record("\(path) should have been refused")
            case .failure(let error): #expect(error.reason.contains(expected), "reason was: \(error.reason)")
            }
        }
    }

    @Test("dlopen errors for known libraries name the Debian package")
    func packageHints() {
        let reason = PluginLoader.explainDlopenFailure("libibverbs.so.1: cannot open shared object file: No such file or directory",
                                                       path: "/usr/lib/transfer-engine/plugins/libtransport_rdma.so")
        #expect(reason.contains("the rdma plugin needs libibverbs.so.1") && reason.contains("libibverbs1"))
    }

    @Test("a protocol without a plugin falls back to TCP with exactly one warning naming the file and the package")
    func fallbackWithoutPlugin() throws {
        // barex has no plugin in this build (checked), so the search finds nothing.
        #expect(!FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent("libtransport_barex.so").path))
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "barex"), environment: TestSupport.cleanEnvironment(), logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "tcp")
        let warnings = capture.messages(at: .warning)
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("protocol 'barex' is unavailable") == true)
        #expect(warnings.first?.contains("libtransport_barex.so") == true)
        #expect(warnings.first?.contains("transfer-engine-plugin-barex") == true, "\(warnings)")
        // Debian package names have no underscores.
        #expect(ProtocolSelector.packageName("nvlink_intra") == "transfer-engine-plugin-nvlink-intra")
    }

    @Test("a plugin reporting hardware absent falls back to TCP and says why; strict mode makes it an error")
    func fallbackHardwareAbsent() throws {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_rdma.so", defines: ["FIXTURE_ABSENT", "FIXTURE_PROTOCOL=\"rdma\""], in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "rdma"), environment: environment, logger: logger)
        engine.shutdown()
        #expect(engine.activeProtocol == "tcp")
        let warnings = capture.messages(at: .warning)
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("hardware absent: no fixture device found") == true, "\(warnings)")
        #expect(warnings.first?.contains("attach a fixture device") == true)

        var strict = environment
        strict["MC_STRICT_PROTOCOL"] = "1"
        do {
            _ = try TransferEngine(configuration: EngineConfiguration(protocolName: "rdma"), environment: strict)
            Issue.record("strict mode should refuse the fallback")
        } catch let error as EngineError {
            guard case .protocolUnavailable(let name, let reason) = error else { Issue.record("\(error)"); return }
            #expect(name == "rdma" && reason.contains("hardware absent"))
        }
    }

    @Test("MC_FORCE_MNNVL with rdma selects nvlink")
    func forceMNNVL() throws {
        let selection = try ProtocolSelector.select(requested: "rdma", catalog: PluginCatalog(directories: []),
                                                    environment: ["MC_FORCE_MNNVL": "true"], probeOptionsJSON: "{}")
        #expect(selection.requested == "nvlink" && selection.effective == "tcp")
    }

    @Test("an unknown protocol is an error listing the valid names, including plugin-declared ones")
    func unknownProtocol() throws {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_custom.so", defines: ["FIXTURE_PROTOCOL=\"custom,loopcopy\""], in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        do {
            _ = try TransferEngine(configuration: EngineConfiguration(protocolName: "infiniband9000"), environment: environment)
            Issue.record("expected unknownProtocol")
        } catch let error as EngineError {
            #expect(error.description.contains("unknown protocol 'infiniband9000'"))
            #expect(error.description.contains("rdma") && error.description.contains("nvlink_intra") && error.description.contains("loopcopy"))
        }
        // A protocol that only a plugin declares (not its file name) is found by loading the plugins.
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "loopcopy")
    }

    @Test("data moves through a plugin's submit/poll vtable, with descriptor fragments published")
    func dataThroughPlugin() throws {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_loopcopy.so", in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        defer { target.shutdown(); initiator.shutdown() }
        #expect(target.activeProtocol == "loopcopy")
        let remote = TestBuffer(1 << 20)
        let local = TestBuffer(1 << 20)
        local.fillPattern(seed: 9)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count), location: "cpu:0")
        let published = target.localDescriptor
        #expect(published.protocolName == "loopcopy" && published.extra["fixture_pid"] != nil)
        #expect(published.buffers.first?.extra["fixture_key"] == .array([.uint(7)]))
        #expect(published.buffers.first?.name == "cpu:0")

        let handle = try initiator.openSegment(target.segmentName)
        let requests = (0..<16).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) * 65536, segment: handle,
                            remoteAddress: remote.address + UInt64(i) * 65536, length: 65536)
        }
        let first = initiator.nicLoadStats()  // ABI 1.2 stats: the fixture's one device, before the batch
        try initiator.transferBatchSync(requests)
        #expect(remote.equals(local, length: local.count))
        #expect(first.map(\.deviceName) == ["fixture0"] && first.first?.ewmaBandwidthBps == 0, "\(first)")
        usleep(10_000)
        let after = initiator.nicLoadStats()
        #expect(after.first?.inflightBytes == 0 && (after.first?.ewmaBandwidthBps ?? 0) > 0, "\(after)")
        // Out-of-range requests are refused before they reach the plugin.
        #expect(throws: EngineError.self) {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address + 1, length: UInt64(remote.count))
        }
    }

    @Test("stats answers are read defensively; a device's bandwidth averages the rates between calls")
    func deviceStats() {
        let parsed = PluginDeviceStats.parse(#"{"devices":[{"name":"mlx5_0","bytes_read":10,"bytes_written":20,"inflight_bytes":5,"errors":1},{"name":""},{"bytes_read":1},{"name":"x","bytes_read":-1},{"name":"y","bytes_read":"7"},3]}"#)
        #expect(parsed == [PluginDeviceStats(name: "mlx5_0", bytesRead: 10, bytesWritten: 20, inflightBytes: 5, errors: 1)])
        #expect(PluginDeviceStats.parse("[]").isEmpty && PluginDeviceStats.parse("{").isEmpty && PluginDeviceStats.parse(#"{"devices":7}"#).isEmpty)
        #expect(PluginDeviceStats.parse(#"{"devices":[{"name":""# + String(repeating: "n", count: 200) + #""}]}"#).first?.name.utf8.count == 63)
        let tracker = NicLoadTracker()
        var device = DeviceStatistics(transport: "p", deviceName: "d", bytesRead: 0, bytesWritten: 0, inflightBytes: 0, errors: 0)
        #expect(tracker.update([device], now: 1_000_000_000).first?.ewmaBandwidthBps == 0)
        device.bytesWritten = 125_000_000  // 1 Gbit in the second that follows
        #expect(tracker.update([device], now: 2_000_000_000).first?.ewmaBandwidthBps == 1e9)
        let idle = tracker.update([device], now: 3_000_000_000).first?.ewmaBandwidthBps ?? -1
        #expect(abs(idle - 0.7e9) < 1, "\(idle)")  // 0.3 x 0 + 0.7 x 1e9
    }

    @Test("an ABI 1.0 descriptor ending right before a PROT_NONE page loads and moves data (the host reads only struct_size bytes)")
    func olderDescriptorAtPageEnd() throws {
        let directory = try TestSupport.temporaryDirectory()
        let path = try FixturePlugins.build("libtransport_loopcopy.so", defines: ["FIXTURE_V10_GUARDED"], in: directory)
        let plugin = try PluginLoader.load(path: path).get()
        #expect(plugin.info.abiVersion == "\(TE_ABI_MAJOR).0")
        #expect(plugin.info.descriptorSize < MemoryLayout<te_plugin_descriptor>.size)
        #expect(!plugin.allocatesMemory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        defer { target.shutdown(); initiator.shutdown() }
        #expect(target.activeProtocol == "loopcopy")
        let remote = TestBuffer(1 << 16)
        let local = TestBuffer(1 << 16)
        local.fillPattern(seed: 3)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count), location: "cpu:0")
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: UInt64(local.count))
        #expect(remote.equals(local, length: local.count))
        #expect(initiator.nicLoadStats().isEmpty)  // no stats entry in a 1.0 descriptor
        // A managed buffer falls back to host memory: the 1.0 plugin has no allocate_memory.
        let managed = try initiator.allocateManagedBuffer(length: 4096)
        try initiator.freeManagedBuffer(address: managed)
    }

    @Test("a synchronous transfer whose completion another caller reaps still returns, with its own result")
    func syncCompletionReapedByAnotherCaller() throws {
        // The fixture hides a completion from its submitting thread for 20 ms, so two threads of
        // synchronous transfers reap each other's: a lost hand-over shows as a 5 s timeout.
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_loopcopy.so", defines: ["FIXTURE_HANDOFF"], in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path, "MC_TRANSFER_TIMEOUT": "5"])
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy"), environment: environment)
        defer { target.shutdown(); initiator.shutdown() }
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count), location: "cpu:0")
        let handle = try initiator.openSegment(target.segmentName)
        let failures = LockedCounter(), mismatches = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            let offset = thread * (512 << 10)
            for i in 0..<100 {
                memset(local.pointer + offset, Int32(truncatingIfNeeded: i &+ thread), 4096)
                do {
                    try initiator.transferSync(.write, localAddress: local.address + UInt64(offset), segment: handle,
                                               remoteAddress: remote.address + UInt64(offset), length: 4096)
                } catch { failures.increment(); return }
                if memcmp(local.pointer + offset, remote.pointer + offset, 4096) != 0 { mismatches.increment() }
            }
        }
        #expect(failures.value == 0 && mismatches.value == 0)
        #expect(initiator.syncCompletionsReapedElsewhere > 0, "no completion changed threads")
    }
}

/// Upstream's rdma/MNNVL rule over real plugin files: fixtures standing in for hardware that is absent here.
@Suite("rdma and nvlink selection")
struct MNNVLSelectionTests {
    private func directory(rdmaAbsent: Bool) throws -> URL {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_rdma.so", defines: (rdmaAbsent ? ["FIXTURE_ABSENT"] : []) + ["FIXTURE_PROTOCOL=\"rdma\""], in: directory)
        try FixturePlugins.build("libtransport_nvlink.so", defines: ["FIXTURE_PROTOCOL=\"nvlink\""], in: directory)
        return directory
    }

    @Test("rdma with no usable RDMA NIC runs nvlink when it is available, saying so at info level; without nvlink it is TCP with one warning")
    func rdmaAbsentUsesMNNVL() throws {
        let directory = try directory(rdmaAbsent: true)
        let selection = try ProtocolSelector.select(requested: "rdma", catalog: PluginCatalog(directories: [directory.path]),
                                                    environment: ["MC_STRICT_PROTOCOL": "1"], probeOptionsJSON: #"{"protocol":"rdma"}"#)
        #expect(selection.effective == "nvlink" && selection.warningLine == nil)
        #expect(selection.notice?.contains("no fixture device found") == true, "\(selection.notice ?? "")")

        try FileManager.default.removeItem(at: directory.appendingPathComponent("libtransport_nvlink.so"))
        let fallback = try ProtocolSelector.select(requested: "rdma", catalog: PluginCatalog(directories: [directory.path]),
                                                   environment: [:], probeOptionsJSON: "{}")
        #expect(fallback.effective == "tcp" && fallback.warningLine?.contains("protocol 'rdma' is unavailable") == true)
        #expect(throws: EngineError.self) {
            try ProtocolSelector.select(requested: "rdma", catalog: PluginCatalog(directories: [directory.path]),
                                        environment: ["MC_STRICT_PROTOCOL": "1"], probeOptionsJSON: "{}")
        }
    }

    @Test("rdma with a usable NIC stays rdma; MC_FORCE_MNNVL=true picks nvlink anyway")
    func rdmaPresent() throws {
        let directory = try directory(rdmaAbsent: false)
        let catalog = PluginCatalog(directories: [directory.path])
        #expect(try ProtocolSelector.select(requested: "rdma", catalog: catalog, environment: [:], probeOptionsJSON: "{}").effective == "rdma")
        #expect(try ProtocolSelector.select(requested: "rdma", catalog: catalog, environment: ["MC_FORCE_MNNVL": "true"], probeOptionsJSON: "{}").effective == "nvlink")
    }

    @Test("the nvlink and nvlink_intra plugins load and answer precisely that the CUDA driver is missing; hip that HIP finds no GPU; TCP with one warning")
    func gpuRuntimesAbsent() throws {
        let hipBuilt = FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent("libtransport_hip.so").path)
        let cases = [
            ("nvlink", "library missing: the CUDA driver is not installed (libcuda-not-installed.so.1", "install the NVIDIA driver (libcuda.so.1)"),
            ("nvlink_intra", "library missing: the CUDA driver is not installed (libcuda-not-installed.so.1", "install the NVIDIA driver (libcuda.so.1)"),
        ] + (hipBuilt || ProcessInfo.processInfo.environment["TE_REQUIRE_HIP"] == "1"
            // Debian's libamdhip64 without a GPU: hipGetDeviceCount answers hipErrorNoDevice (100).
            ? [("hip", "hardware absent: no usable GPU (hipGetDeviceCount: hipErrorNoDevice)", "check rocm-smi")] : [])
        for (name, reason, hint) in cases {
            let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path,
                                                            "MC_CUDA_LIBRARY": "libcuda-not-installed.so.1"])
            let (logger, capture) = TestSupport.capturingLogger()
            let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: name), environment: environment, logger: logger)
            engine.shutdown()
            #expect(engine.activeProtocol == "tcp")
            let warnings = capture.messages(at: .warning)
            #expect(warnings.count == 1 && warnings[0].contains(reason) && warnings[0].contains(hint), "\(name): \(warnings)")
        }
    }
}
