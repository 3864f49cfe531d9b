import Foundation
import Testing
@testable import TransferEngine

/// An engine that moves data within its own segment (Mooncake Store's local copies): the segment
/// is opened by the engine's own name, then written and read many times, synchronously and in
/// batches. The second transfer once hung for ever (the local descriptor was rebuilt under the
/// lock it takes itself); debug builds now stop on any such re-entry instead of hanging. Host
/// memory to host memory of the own segment is one memmove whatever the transport (an rdma
/// endpoint connected to itself hung in the guest); every transport runs these cases.
@Suite("transfers to the engine's own segment", .serialized)
struct SelfTransferTests {
    /// A transport this machine can run, with the environment that selects it.
    struct Case: CustomTestStringConvertible, Sendable {
        var protocolName: String
        var settings: [String: String]
        /// Why this machine cannot run it (the plugin was not built), or nil.
        var unavailable: String?
        var testDescription: String { settings["MC_EFA_PROVIDER"].map { "\(protocolName) over \($0)" } ?? protocolName }
    }

    static let cases: [Case] = {
        let products = TestSupport.productsDirectory.path
        func built(_ name: String) -> Bool { FileManager.default.fileExists(atPath: "\(products)/libtransport_\(name).so") }
        let plugin = ["MC_TRANSPORT_PLUGIN_PATH": products, "MC_STRICT_PROTOCOL": "1"]
        return [
            Case(protocolName: "tcp", settings: [:]),
            Case(protocolName: "shm", settings: plugin, unavailable: built("shm") ? nil : "libtransport_shm.so was not built"),
            Case(protocolName: "efa", settings: plugin.merging(["MC_EFA_PROVIDER": "tcp;ofi_rxm"]) { $1 },
                 unavailable: EFAPluginBuild.present ? nil : "libtransport_efa.so was not built (install libfabric-dev)"),
            Case(protocolName: "efa", settings: plugin.merging(["MC_EFA_PROVIDER": "shm"]) { $1 },
                 unavailable: EFAPluginBuild.present ? nil : "libtransport_efa.so was not built (install libfabric-dev)"),
            Case(protocolName: "cxl", settings: plugin, unavailable: CXLPluginBuild.present ? nil : "libtransport_cxl.so was not built (install libcxl-dev libdaxctl-dev)"),
            // An engine that owns a (file-backed) namespace: its memory goes over TCP, beside the plugin.
            Case(protocolName: "nvmeof", settings: plugin,
                 unavailable: NVMeoFPluginBuild.present ? nil : "libtransport_nvmeof.so was not built (install libnvme-dev)"),
        ]
    }()

    /// A cxl pool file or an nvmeof namespace file for those cases (the others need none).
    private static func environment(for item: Case, pool: String) -> [String: String] {
        var settings = item.settings
        if item.protocolName == "cxl" || item.protocolName == "nvmeof" { settings["MC_CXL_DEV_PATH"] = pool }
        if item.protocolName == "nvmeof" { settings["MC_NVMEOF_NAMESPACES"] = pool }
        var environment = TestSupport.cleanEnvironment(settings)
        environment.removeValue(forKey: "FI_PROVIDER")
        return environment
    }

    @Test("40 rounds of sync and batched writes and reads to the own segment, bytes verified", arguments: cases)
    func repeated(_ item: Case) throws {
        if let reason = item.unavailable {
            // Stated, not silent: scripts/test.sh sets TE_REQUIRE_* where the plugin must exist.
            print("skipped \(item.testDescription): \(reason)")
            return
        }
        let pool = "/dev/shm/te-test-self-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        if item.protocolName == "cxl" || item.protocolName == "nvmeof" {
            let fd = open(pool, O_CREAT | O_RDWR | O_TRUNC, 0o600)
            guard fd >= 0, ftruncate(fd, 64 << 20) == 0 else { throw TestFailure("cannot create \(pool)") }
            close(fd)
        }
        defer { unlink(pool) }
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: item.protocolName),
                                        environment: Self.environment(for: item, pool: pool), logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == item.protocolName)
        let size = 1 << 20
        // Managed buffers as upstream's Python users allocate them (a cxl pool chunk for cxl).
        let a = try engine.allocateManagedBuffer(length: UInt64(size))
        let b = try engine.allocateManagedBuffer(length: UInt64(size))
        defer { try? engine.freeManagedBuffer(address: a); try? engine.freeManagedBuffer(address: b) }
        let pa = try #require(UnsafeMutableRawPointer(bitPattern: UInt(a))), pb = try #require(UnsafeMutableRawPointer(bitPattern: UInt(b)))
        let handle = try engine.openSegment(engine.segmentName)
        #expect(handle == 0)
        for round in 0..<40 {
            let length = [4096, 65537, 1, 4096][round % 4]
            let offset = UInt64(round * 13)
            for i in 0..<length { pa.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ round), toByteOffset: i, as: UInt8.self) }
            memset(pb, 0, length + Int(offset))
            if round % 2 == 0 {
                try engine.transferSync(.write, localAddress: a, segment: handle, remoteAddress: b + offset, length: UInt64(length))
                #expect(memcmp(pa, pb + Int(offset), length) == 0, "round \(round): write")
                memset(pa, 0, length)
                try engine.transferSync(.read, localAddress: a, segment: handle, remoteAddress: b + offset, length: UInt64(length))
            } else {
                let batch = try engine.allocateBatch(capacity: 2)
                let half = UInt64(length / 2)
                try engine.submit([TransferRequest(operation: .write, localAddress: a, segment: handle, remoteAddress: b + offset, length: half),
                                   TransferRequest(operation: .write, localAddress: a + half, segment: handle, remoteAddress: b + offset + half,
                                                   length: UInt64(length) - half)], to: batch)
                #expect(try engine.wait(batch: batch, timeoutNs: 10_000_000_000), "round \(round): batched write")
                #expect(try engine.statuses(batch: batch).allSatisfy { $0.state == .completed })
                try engine.freeBatch(batch)
                #expect(memcmp(pa, pb + Int(offset), length) == 0, "round \(round): batched write")
                memset(pa, 0, length)
                try engine.transferBatchSync([TransferRequest(operation: .read, localAddress: a, segment: handle, remoteAddress: b + offset,
                                                              length: UInt64(length))])
            }
            #expect(memcmp(pa, pb + Int(offset), length) == 0 && pb.load(fromByteOffset: Int(offset), as: UInt8.self) == UInt8(truncatingIfNeeded: round),
                    "round \(round): read back")
        }
        // No transport was asked to reach the own segment and failed (it would log this line).
        let fallbacks = capture.messages(at: .info).filter { $0.contains("cannot reach") }
        #expect(fallbacks.isEmpty, "\(fallbacks)")
    }
}
