import Foundation
import Testing
@testable import TransferEngine

/// Where the rdma tests can run: the host has no RDMA stack (hardware absent is tested there);
/// the soft-RoCE guest (scripts/vm, RXE_VM=1) has rxe devices (data tests run there).
enum RDMAEnvironment {
    static var pluginBuilt: Bool {
        FileManager.default.fileExists(atPath: TestSupport.productsDirectory.appendingPathComponent("libtransport_rdma.so").path)
            || ProcessInfo.processInfo.environment["TE_REQUIRE_RDMA"] == "1"
    }
    static var inGuest: Bool { ProcessInfo.processInfo.environment["RXE_VM"] == "1" }
    /// The rxe devices the guest created (RXE_DEVICES="rxe0 rxe1").
    static var devices: [String] { (ProcessInfo.processInfo.environment["RXE_DEVICES"] ?? "rxe0").split(separator: " ").map(String.init) }
    static var noRDMAHere: Bool {
        !inGuest && !FileManager.default.fileExists(atPath: "/dev/infiniband/uverbs0")
    }

    static func counter(_ device: String, _ name: String) -> UInt64 {
        let path = "/sys/class/infiniband/\(device)/ports/1/hw_counters/\(name)"
        return (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
    }
}

@Suite("rdma plugin: no RDMA stack on this host", .enabled(if: RDMAEnvironment.pluginBuilt && RDMAEnvironment.noRDMAHere))
struct RDMAAbsentTests {
    @Test("ibv_get_device_list fails with ENOSYS here: hardware absent, TCP with one warning; strict mode refuses")
    func hardwareAbsent() throws {
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path])
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "rdma", deviceName: "auto-discovery"),
                                        environment: environment, logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "tcp")
        let warnings = capture.messages(at: .warning)
        #expect(warnings.count == 1, "\(warnings)")
        #expect(warnings.first?.contains("protocol 'rdma' is unavailable (rdma plugin: hardware absent: the kernel has no RDMA stack (ibv_get_device_list: ENOSYS))") == true,
                "\(warnings)")
        #expect(throws: EngineError.self) {
            _ = try TransferEngine(configuration: EngineConfiguration(protocolName: "rdma"),
                                   environment: TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path,
                                                                              "MC_STRICT_PROTOCOL": "1"]))
        }
    }
}

/// Two engine processes over soft-RoCE in the QEMU guest (scripts/vm/test-rdma.sh runs these).
@Suite("rdma plugin over soft-RoCE (in the guest)", .serialized, .enabled(if: RDMAEnvironment.pluginBuilt && RDMAEnvironment.inGuest))
struct RDMAGuestTests {
    private func environment(_ extra: [String: String] = [:]) -> [String: String] {
        var settings = ["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path, "MC_STRICT_PROTOCOL": "1"]
        for (key, value) in extra { settings[key] = value }
        return TestSupport.cleanEnvironment(settings)
    }

    private func pair(devices: String, _ extra: [String: String] = [:]) throws -> (ServeProcess, TransferEngine, LogCapture) {
        let target = try ServeProcess(bufferSize: "40MiB", environment: environment(extra), protocolName: "rdma", deviceName: devices)
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: "rdma", deviceName: devices),
                                        environment: environment(extra), logger: logger)
        return (target, engine, capture)
    }

    @Test("1 B to 32 MiB written and read back between two processes over rxe0, batches, bounds")
    func sizes() throws {
        let (target, engine, capture) = try pair(devices: "rxe0")
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "rdma")
        #expect(capture.messages(at: .info).contains { $0.contains("rdma plugin: device rxe0") && $0.contains("RoCE v2") })
        let source = TestBuffer(32 << 20), sink = TestBuffer(32 << 20)
        try engine.registerMemory(address: source.address, length: UInt64(source.count))
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        let handle = try engine.openSegment(target.segment)
        let descriptor = try engine.descriptor(of: handle)
        #expect(descriptor.protocolName == "rdma")
        for (index, size) in [1, 7, 4095, 4096, 65536 + 3, 1 << 20, (4 << 20) + 5, 32 << 20].enumerated() {
            source.fillPattern(seed: UInt8(index + 1))
            memset(sink.pointer, 0, size)
            let remote = target.bufferAddress + UInt64(index % 3) * 4097
            let length = UInt64(min(size, Int(target.bufferLength) - (index % 3) * 4097))
            try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: remote, length: length)
            try engine.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: remote, length: length)
            #expect(sink.equals(source, length: Int(length)), "size \(length)")
        }
        // A batch of 64 requests of 64 KiB + 1 (two slices each, the tail merged).
        source.fillPattern(seed: 77)
        let block: UInt64 = 65537
        try engine.transferBatchSync((0..<64).map { i in
            TransferRequest(operation: .write, localAddress: source.address + UInt64(i) * block, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) * block, length: block)
        })
        memset(sink.pointer, 0, sink.count)
        try engine.transferBatchSync((0..<64).map { i in
            TransferRequest(operation: .read, localAddress: sink.address + UInt64(i) * block, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) * block, length: block)
        })
        #expect(sink.equals(source, length: Int(64 * block)))
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: source.address, segment: handle,
                                    remoteAddress: target.bufferAddress + target.bufferLength - 8, length: 64)
        }
        // A cuda:0 range the NIC cannot pin (no GPU, no nvidia-peermem, no CUDA driver here) is
        // refused with what GPUDirect RDMA would need, after trying the dma-buf path.
        let hole = try #require(mmap(nil, 1 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(hole, 1 << 20) }
        let refusal = #expect(throws: EngineError.self) {
            try engine.registerMemory(address: UInt64(UInt(bitPattern: hole)), length: 1 << 20, location: "cuda:0")
        }
        #expect("\(refusal.map { "\($0)" } ?? "")".contains("nvidia-peermem"), "\(String(describing: refusal))")
        // Managed buffers: host memory from the plugin (the target's came from it too), cuda:0 needs the driver.
        let managed = try engine.allocateManagedBuffer(length: 1 << 20, location: "cpu:0")
        try engine.freeManagedBuffer(address: managed)
        let noDriver = #expect(throws: EngineError.self) { _ = try engine.allocateManagedBuffer(length: 1 << 20, location: "cuda:0") }
        #expect("\(noDriver.map { "\($0)" } ?? "")".contains("needs the CUDA driver (libcuda.so.1)"), "\(String(describing: noDriver))")
    }

    @Test("an rdma engine's own segment: repeated sync and batched writes and reads (host memory: local copies)")
    func selfTransfer() throws {
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: "rdma", deviceName: "rxe0"),
                                        environment: environment(), logger: logger)
        defer { engine.shutdown() }
        let a = TestBuffer(1 << 20), b = TestBuffer(1 << 20)
        try engine.registerMemory(address: a.address, length: 1 << 20)
        try engine.registerMemory(address: b.address, length: 1 << 20)
        let handle = try engine.openSegment(engine.segmentName)
        for round in 0..<20 {
            a.fillPattern(seed: UInt8(round + 1))
            memset(b.pointer, 0, b.count)
            let length = UInt64([4096, 65537, 1, 300_000][round % 4])
            if round % 2 == 0 {
                try engine.transferSync(.write, localAddress: a.address, segment: handle, remoteAddress: b.address + 3, length: length)
            } else {
                try engine.transferBatchSync([TransferRequest(operation: .write, localAddress: a.address, segment: handle,
                                                              remoteAddress: b.address + 3, length: length)])
            }
            #expect(b.equals(a, offset: 3, length: Int(length)), "round \(round): write")
            memset(a.pointer, 0, Int(length))
            try engine.transferSync(.read, localAddress: a.address, segment: handle, remoteAddress: b.address + 3, length: length)
            #expect(a.equals(b, otherOffset: 3, length: Int(length)), "round \(round): read")
        }
        let fallbacks = capture.messages(at: .info).filter { $0.contains("cannot reach") }
        #expect(fallbacks.isEmpty, "\(fallbacks)")
    }

    @Test("a handshake claiming a live peer's path mid-transfer costs it a reconnect, not bytes; endpoints stop at MC_RDMA_MAX_ENDPOINTS")
    func hostileHandshakes() throws {
        let limits = ["MC_RDMA_MAX_ENDPOINTS": "3"]
        let target = try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: "rdma", deviceName: "rxe0"),
                                        environment: environment(limits))
        defer { target.shutdown() }
        let (initiator, _) = try { () throws -> (TransferEngine, LogCapture) in
            let (logger, capture) = TestSupport.capturingLogger()
            return (try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: "rdma", deviceName: "rxe0"),
                                       environment: environment(), logger: logger), capture)
        }()
        defer { initiator.shutdown() }
        let size = 48 << 20
        let remote = TestBuffer(size), local = TestBuffer(size)
        local.fillPattern(seed: 21)
        try target.registerMemory(address: remote.address, length: UInt64(size))
        try initiator.registerMemory(address: local.address, length: UInt64(size))
        let gid = try #require(try target.descriptor(of: 0).extra["devices"]?.arrayValue?.first?["gid"]?.stringValue)
        func handshake(from path: String) throws -> String {
            let request = #"{"local_nic_path":"\#(path)","peer_nic_path":"\#(target.segmentName)@rxe0","local_lid":0,"local_gid":"\#(gid)","qp_num":[4242,4243]}"#
            let reply = try HandshakeClient.exchange(host: "127.0.0.1", port: target.rpcPort, message: .init(kind: .connection, json: request),
                                                     timeouts: .init(connectMs: 2000, replyMs: 10_000))
            return (try JSONValue.parse(reply.json))["reply_msg"]?.stringValue ?? "?"
        }
        // A long write; meanwhile a handshake claims the initiator's path and replaces the target's
        // endpoint for it. The initiator's failed slices rebuild its connection; every byte arrives.
        let handle = try initiator.openSegment(target.segmentName)
        let batch = try initiator.allocateBatch(capacity: 1)
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: UInt64(size))], to: batch)
        usleep(200_000)
        _ = try handshake(from: "\(initiator.segmentName)@rxe0")
        #expect(try initiator.wait(batch: batch, timeoutNs: 120_000_000_000))
        #expect(try initiator.statuses(batch: batch).allSatisfy { $0.state == .completed })
        #expect(remote.equals(local, length: size))
        // The bound: the initiator holds one of three endpoints; two more fit, the next is refused.
        #expect(try handshake(from: "fake-1@rxe0") == "")
        #expect(try handshake(from: "fake-2@rxe0") == "")
        #expect(try handshake(from: "fake-3@rxe0").contains("MC_RDMA_MAX_ENDPOINTS"))
    }

    @Test("two engines opening each other at the same moment end on matching endpoints: every first write completes promptly (no slice-timeout flush)")
    func simultaneousOpen() throws {
        var slowest = 0.0
        for round in 0..<4 {
            let engines = try (0..<2).map { _ in
                try TransferEngine(configuration: EngineConfiguration(localHostname: "127.0.0.1", protocolName: "rdma", deviceName: "rxe0"),
                                   environment: environment(["MC_SLICE_TIMEOUT": "5"]))
            }
            defer { engines.forEach { $0.shutdown() } }
            let buffers = [TestBuffer(1 << 20), TestBuffer(1 << 20)]
            for (engine, buffer) in zip(engines, buffers) { try engine.registerMemory(address: buffer.address, length: UInt64(buffer.count)) }
            let failures = ConditionLock<[String]>([]), times = ConditionLock<[Double]>([])
            DispatchQueue.concurrentPerform(iterations: 2) { side in
                let (engine, local, remote) = (engines[side], buffers[side], buffers[1 - side])
                do {
                    let started = Date()
                    let handle = try engine.openSegment(engines[1 - side].segmentName)
                    try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address + 65536, length: 65536)
                    try engine.transferSync(.read, localAddress: local.address + 131072, segment: handle, remoteAddress: remote.address, length: 65536)
                    times.withLock { $0.append(Date().timeIntervalSince(started)) }
                } catch { failures.withLock { $0.append("round \(round) side \(side): \(error)") } }
            }
            #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
            slowest = max(slowest, times.withLock { $0.max() ?? 0 })
        }
        print("rdma: simultaneous opens: slowest open + first write + read \(String(format: "%.0f", slowest * 1000)) ms")
        #expect(slowest < 3, "a first transfer waited \(slowest) s: the two sides ended on different endpoints")
    }

    @Test("two soft-RoCE devices: slices are sprayed over both, bytes verified",
          .enabled(if: RDMAEnvironment.devices.count >= 2))
    func twoDevices() throws {
        let (target, engine, capture) = try pair(devices: "rxe0,rxe1")
        defer { engine.shutdown() }
        #expect(capture.messages(at: .info).filter { $0.contains("rdma plugin: device rxe") }.count == 2)
        let local = TestBuffer(16 << 20), check = TestBuffer(16 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        try engine.registerMemory(address: check.address, length: UInt64(check.count))
        let handle = try engine.openSegment(target.segment)
        #expect(try engine.descriptor(of: handle).json["devices"]?.arrayValue?.count == 2)
        let before = RDMAEnvironment.devices.prefix(2).map { RDMAEnvironment.counter($0, "sent_pkts") }
        local.fillPattern(seed: 5)
        try engine.transferBatchSync((0..<16).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) << 20, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
        })
        try engine.transferBatchSync((0..<16).map { i in
            TransferRequest(operation: .read, localAddress: check.address + UInt64(i) << 20, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
        })
        #expect(check.equals(local, length: 16 << 20))
        let after = RDMAEnvironment.devices.prefix(2).map { RDMAEnvironment.counter($0, "sent_pkts") }
        for (device, (old, new)) in zip(RDMAEnvironment.devices, zip(before, after)) {
            #expect(new > old + 1000, "\(device) sent \(new - old) packets: the slices were not spread over both devices")
        }
    }

    @Test("the target is killed mid-batch: every task ends, failures carry the reason, nothing hangs")
    func peerDeath() throws {
        // Soft-RoCE retries a vanished peer QP forever: the slice timeout flushes the endpoint.
        let (target, engine, capture) = try pair(devices: "rxe0", ["MC_SLICE_TIMEOUT": "5"])
        defer { engine.shutdown() }
        let local = TestBuffer(32 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segment)
        let batch = try engine.allocateBatch(capacity: 128)
        func round(_ index: Int) throws {
            try engine.submit((0..<32).map { i in
                TransferRequest(operation: index % 2 == 0 ? .write : .read, localAddress: local.address + UInt64(i) << 20, segment: handle,
                                remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
            }, to: batch)
        }
        // 32 MiB in flight (seconds at emulation speed) when the target dies; more submitted after.
        try round(0)
        let started = Date()
        target.kill()
        for index in 1..<4 { try round(index) }
        #expect(try engine.wait(batch: batch, timeoutNs: 120_000_000_000), "tasks still pending after the peer died")
        let statuses = try engine.statuses(batch: batch)
        print("rdma: batch ended \(Date().timeIntervalSince(started)) s after the kill: \(statuses.filter { $0.state == .completed }.count) completed, \(statuses.filter { $0.state == .failed }.count) failed")
        for line in capture.messages(at: .warning) + capture.messages(at: .error) { print("rdma log: \(line)") }
        #expect(statuses.allSatisfy { $0.state == .completed || $0.state == .failed })
        let failed = statuses.filter { $0.state == .failed }
        #expect(!failed.isEmpty, "the peer died after the batch finished: nothing was tested")
        #expect(failed.allSatisfy { ($0.error ?? "").contains("rdma") }, "\(failed.first?.error ?? "")")
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 4096)
        }
    }

    @Test("rxe0's RoCE address disappears mid-batch: every request fails over to tcp and completes, bytes verified")
    func failoverWhenTheRoCEPathDies() throws {
        // Two engines on one rxe device loop back inside it whatever its link does; removing the
        // netdev's address takes away the RoCE v2 GID their queue pairs use, while tcp runs on 127.0.0.1.
        let env = ProcessInfo.processInfo.environment
        guard let netdev = env["RXE_NETDEV"], let address = env["RXE_IP"], !netdev.isEmpty, !address.isEmpty else {
            Issue.record("RXE_NETDEV / RXE_IP are not set in the guest")
            return
        }
        func roceAddress(_ verb: String) throws {
            let (status, _, err) = try TestSupport.run("/usr/sbin/ip", ["addr", verb, "\(address)/24", "dev", netdev])
            guard status == 0 else { throw TestFailure("ip addr \(verb) \(address)/24 dev \(netdev): \(err)") }
        }
        let (target, engine, capture) = try pair(devices: "rxe0", ["MC_SLICE_TIMEOUT": "3", "MC_PATH_COOLDOWN_MS": "60000"])
        var restored = false
        defer {
            engine.shutdown()
            if !restored { try? roceAddress("add") }
        }
        let source = TestBuffer(32 << 20), sink = TestBuffer(32 << 20)
        try engine.registerMemory(address: source.address, length: UInt64(source.count))
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        source.fillPattern(seed: 42)
        let handle = try engine.openSegment(target.segment)
        #expect(try engine.routes(segment: handle).first?.order.map(\.protocolName) == ["rdma", "tcp"])
        try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: target.bufferAddress, length: 4096)
        let batch = try engine.allocateBatch(capacity: 32)
        try engine.submit((0..<32).map { i in
            TransferRequest(operation: .write, localAddress: source.address + UInt64(i) << 20, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
        }, to: batch)
        let died = Date()
        try roceAddress("del")
        #expect(try engine.wait(batch: batch, timeoutNs: 60_000_000_000), "tasks still pending after the link died")
        let statuses = try engine.statuses(batch: batch)
        print("rdma: RoCE address removed -> in-flight batch done in \(String(format: "%.2f", Date().timeIntervalSince(died))) s: \(statuses.filter { $0.state == .completed }.count) of 32 completed")
        #expect(statuses.allSatisfy { $0.state == .completed }, "\(statuses.first { $0.state != .completed }?.error ?? "")")
        // With the link down, new requests start on tcp once rdma failed: read everything back.
        let started = Date()
        try engine.transferBatchSync((0..<32).map { i in
            TransferRequest(operation: .read, localAddress: sink.address + UInt64(i) << 20, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
        })
        print("rdma: 32 MiB read back in \(String(format: "%.2f", Date().timeIntervalSince(started))) s without the RoCE address")
        #expect(sink.equals(source, length: sink.count))
        // Whichever of the two batches met the dead link first failed over (once per path).
        let failovers = capture.messages(at: .warning).filter { $0.contains("rdma path to") && $0.contains("failing over to tcp") }
        for line in capture.messages(at: .warning) { print("rdma log: \(line)") }
        #expect(failovers.count == 1, "\(failovers)")
        #expect(try engine.routes(segment: handle).first?.order.map(\.protocolName) == ["tcp", "rdma"])
        try roceAddress("add")
        restored = true
    }
}
