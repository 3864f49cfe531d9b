import Foundation
@testable import TransferEngine

/// One transport as the conformance suite runs it: how to start the two engines, and which
/// scenarios it cannot run here (each with the reason).
struct ConformanceCase: CustomStringConvertible, Sendable {
    enum Scenario: String, Sendable {
        case sizes, batch, threads, bounds, killedPeer, restartedPeer
    }

    /// Where the target's bytes live.
    enum TargetKind: Sendable {
        /// A `transfer-engine serve` process; its registered buffer is the target.
        case process
        /// A second engine in this process (the fixture plugin copies within one process).
        case inProcess
        /// A `serve` process whose segment serves a storage range (NVMe-oF namespace): the target.
        case storage
    }

    let name: String
    let protocolName: String
    /// Nil when the case runs here; else why not (plugin not built).
    let unavailable: String?
    let kind: TargetKind
    /// The device_name both engines get (nil: none).
    var deviceName: String? = nil
    /// Why the bytes stay reachable after the target process died (a shared pool or file), if they do.
    var sharedMedium: String? = nil
    /// The largest request the size sweep makes, and why it stops short of 64 MiB (nil: no cap).
    var sizeCap: (bytes: Int, reason: String)? = nil
    /// Scenarios this transport skips, with the reason.
    let skips: [Scenario: String]
    /// Extra settings for both engines (files it needs are created by `prepare`).
    let settings: @Sendable (URL) throws -> [String: String]

    var description: String { name }

    /// The environment for both engines, in a fresh directory.
    func environment() throws -> [String: String] {
        let directory = try TestSupport.temporaryDirectory("te-conf")
        try FixturePlugins.build("libtransport_loopcopy.so", in: directory)
        var values = ["MC_TRANSPORT_PLUGIN_PATH": "\(directory.path):\(TestSupport.productsDirectory.path)", "MC_STRICT_PROTOCOL": "1",
                      "MC_TRANSFER_TIMEOUT": "5"]
        for (key, value) in try settings(directory) { values[key] = value }
        var environment = TestSupport.cleanEnvironment(values)
        environment.removeValue(forKey: "FI_PROVIDER")
        return environment
    }

    /// The reason this case skips `scenario`, or nil when it runs it. CONFORMANCE_ONLY (a
    /// substring of case names, e.g. "rdma" in the soft-RoCE guest) runs only the matching cases.
    func skipReason(_ scenario: Scenario) -> String? {
        if let only = ProcessInfo.processInfo.environment["CONFORMANCE_ONLY"], !only.isEmpty, !name.contains(only) {
            return "CONFORMANCE_ONLY=\(only) selects other cases here"
        }
        return unavailable ?? skips[scenario]
    }

    /// The engine configuration both sides use.
    var configuration: EngineConfiguration {
        EngineConfiguration(localHostname: "127.0.0.1", protocolName: protocolName, deviceName: deviceName ?? "")
    }

    private static func built(_ file: String, _ package: String) -> String? {
        FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent(file).path)
            ? nil : "\(file) was not built (install \(package))"
    }

    /// Creates a file of `size` bytes (a CXL pool or an NVMe-oF namespace stand-in).
    static func file(in directory: URL, _ name: String, size: Int) throws -> String {
        let path = directory.appendingPathComponent(name).path
        guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(size)) == 0 else {
            throw TestFailure("cannot create \(path)")
        }
        return path
    }

    /// What the emulated guest's kernel NVMe/TCP target does with larger writes.
    static let guestNVMeTCPHang = "in the emulated guest, writes of more than about 8 MiB at once to its own kernel NVMe/TCP target "
        + "never complete (also with one worker), and a plain `dd bs=16M oflag=direct` to the device hangs that kernel too"

    /// Why efa over shm skips the scenarios that kill a target process.
    static let shmDeadPeer = "libfabric 1.17's shm provider takes the peer's shared-memory region lock in fi_write and spins on it "
        + "forever when the peer was killed holding it (seen here once; Plugins/EFA/README.md)"

    /// Every transport this machine can run without a device or a guest.
    static let all: [ConformanceCase] = [
        ConformanceCase(name: "tcp", protocolName: "tcp", unavailable: nil, kind: .process, skips: [:]) { _ in [:] },
        ConformanceCase(name: "fixture (loopcopy)", protocolName: "loopcopy", unavailable: nil, kind: .inProcess,
                        skips: [.restartedPeer: "the fixture copies within one process; its peer cannot restart under the same name"]) { _ in [:] },
        ConformanceCase(name: "shm", protocolName: "shm", unavailable: built("libtransport_shm.so", "nothing: it always builds"),
                        kind: .process, skips: [:]) { _ in [:] },
        ConformanceCase(name: "efa over tcp;ofi_rxm", protocolName: "efa", unavailable: built("libtransport_efa.so", "libfabric-dev"),
                        kind: .process, skips: [:]) { _ in ["MC_EFA_PROVIDER": "tcp;ofi_rxm"] },
        ConformanceCase(name: "efa over shm", protocolName: "efa", unavailable: built("libtransport_efa.so", "libfabric-dev"),
                        kind: .process,
                        skips: [.killedPeer: shmDeadPeer, .restartedPeer: shmDeadPeer]) { _ in
            ["MC_EFA_PROVIDER": "shm"]
        },
        ConformanceCase(name: "cxl on a pool file", protocolName: "cxl", unavailable: built("libtransport_cxl.so", "libcxl-dev and libdaxctl-dev"),
                        kind: .process, sharedMedium: "the pool outlives its processes", skips: [:]) { directory in
            ["MC_CXL_DEV_PATH": try file(in: directory, "pool", size: 256 << 20)]
        },
        ConformanceCase(name: "cxl on the emulated CXL device", protocolName: "cxl",
                        unavailable: ProcessInfo.processInfo.environment["TE_CXL_GUEST"] == "1" ? built("libtransport_cxl.so", "libcxl-dev and libdaxctl-dev")
                            : "needs the emulated CXL device (scripts/vm/test-cxl.sh runs this case there)",
                        kind: .process, deviceName: "auto-discovery", sharedMedium: "the pool outlives its processes", skips: [:]) { _ in [:] },
        ConformanceCase(name: "rdma on soft-RoCE (rxe0)", protocolName: "rdma",
                        unavailable: ProcessInfo.processInfo.environment["RXE_VM"] == "1" ? built("libtransport_rdma.so", "libibverbs-dev")
                            : "needs the soft-RoCE guest (scripts/vm/test-rdma.sh runs this case there)",
                        kind: .process, deviceName: "rxe0", skips: [:]) { _ in
            ["MC_SLICE_TIMEOUT": "5", "MC_TRANSFER_TIMEOUT": "30"]
        },
        ConformanceCase(name: "nvmeof on a file namespace", protocolName: "nvmeof", unavailable: built("libtransport_nvmeof.so", "libnvme-dev"),
                        kind: .storage, sharedMedium: "a same-host peer writes the namespace file directly",
                        skips: [.restartedPeer: "a restarted owner publishes the same namespace range; nothing stale to refresh"]) { directory in
            ["MC_NVMEOF_NAMESPACES": try file(in: directory, "namespace", size: 80 << 20)]
        },
        ConformanceCase(name: "nvmeof on a kernel NVMe/TCP target", protocolName: "nvmeof",
                        unavailable: ProcessInfo.processInfo.environment["TE_NVMEOF_TCP"] == nil
                            ? "needs a kernel NVMe-oF target (scripts/vm/test-nvmeof.sh runs this case in the guest)"
                            : built("libtransport_nvmeof.so", "libnvme-dev"),
                        kind: .storage, sharedMedium: "the namespace is the same kernel target for every process",
                        sizeCap: (8 << 20, Self.guestNVMeTCPHang),
                        skips: [.restartedPeer: "a restarted owner publishes the same namespace range; nothing stale to refresh",
                                .killedPeer: "its 64 MiB batch: \(Self.guestNVMeTCPHang) (7 of 64 1 MiB writes completed); "
                                    + "the file-namespace case runs this scenario"]) { _ in
            // The target under emulation is slow: a longer deadline than the suite's 5 s.
            ["MC_NVMEOF_NAMESPACES": ProcessInfo.processInfo.environment["TE_NVMEOF_TCP"] ?? "", "MC_TRANSFER_TIMEOUT": "60"]
        },
    ]
}

/// The far side of a conformance case: a process or an in-process engine, and the range to use.
final class ConformanceTarget: @unchecked Sendable {
    let segment: String
    let base: UInt64
    let length: UInt64
    private var process: ServeProcess?
    private var engine: TransferEngine?
    private var buffer: TestBuffer?

    init(_ testCase: ConformanceCase, environment: [String: String], size: Int = 80 << 20, localHostname: String = "127.0.0.1") throws {
        switch testCase.kind {
        case .process:
            let process = try ServeProcess(bufferSize: "\(size)", environment: environment, protocolName: testCase.protocolName,
                                           deviceName: testCase.deviceName, localHostname: localHostname)
            (segment, base, length) = (process.segment, process.bufferAddress, process.bufferLength)
            self.process = process
        case .storage:
            let process = try ServeProcess(bufferSize: "1MiB", environment: environment, protocolName: testCase.protocolName,
                                           localHostname: localHostname)
            let probe = try TransferEngine(configuration: testCase.configuration, environment: environment)
            defer { probe.shutdown() }
            let range = try probe.descriptor(of: try probe.openSegment(process.segment)).buffers.first { $0.ownProtocol == testCase.protocolName }
            guard let range else { throw TestFailure("the \(testCase.name) target publishes no storage range") }
            (segment, base, length) = (process.segment, range.address, range.length)
            self.process = process
        case .inProcess:
            let engine = try TransferEngine(configuration: testCase.configuration, environment: environment)
            let buffer = TestBuffer(size)
            try engine.registerMemory(address: buffer.address, length: UInt64(size), location: "cpu:0")
            (segment, base, length) = (engine.segmentName, buffer.address, UInt64(size))
            (self.engine, self.buffer) = (engine, buffer)
        }
    }

    /// The target dies abruptly (a killed process, or a shut-down engine).
    func kill() {
        process?.kill()
        engine?.shutdown()
    }

    deinit { engine?.shutdown() }
}
