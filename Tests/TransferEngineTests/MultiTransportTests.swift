import CTransportABI
import Foundation
import Logging
import Testing
@testable import TransferEngine

/// Several transports in one engine: protocol lists, the router's order, failover to the next
/// path, run-time install and removal, transport hints and deadlines. The fixture plugin
/// ("loopcopy", Fixtures/fixture_plugin.c) has fault switches: while a file exists, its requests
/// fail (MC_FIXTURE_FAULT_FILE) or never complete (MC_FIXTURE_STALL_FILE).
@Suite("Several transports in one engine", .serialized)
struct MultiTransportTests {
    private struct Fixture {
        let directory: URL
        let fault: URL
        let stall: URL
        var environment: [String: String]
    }

    private func fixture(_ extra: [String: String] = [:]) throws -> Fixture {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_loopcopy.so", in: directory)
        let fault = directory.appendingPathComponent("fault")
        let stall = directory.appendingPathComponent("stall")
        var environment = TestSupport.cleanEnvironment([
            "MC_TRANSPORT_PLUGIN_PATH": "\(directory.path):\(TestSupport.productsDirectory.path)",
            "MC_FIXTURE_FAULT_FILE": fault.path, "MC_FIXTURE_STALL_FILE": stall.path,
        ])
        for (key, value) in extra { environment[key] = value }
        return Fixture(directory: directory, fault: fault, stall: stall, environment: environment)
    }

    /// Two engines of `protocolName` in this process, a registered buffer on each, the target opened.
    private func pair(_ setup: Fixture, _ protocolName: String, size: Int = 65536, logger: Logger? = nil) throws -> EnginePair {
        try EnginePair(protocolName: protocolName, environment: setup.environment, size: size, logger: logger)
    }

    @Test("protocol lists: empty entries and repeats dropped, tcp always last, unknown names refused with the valid ones")
    func listParsing() throws {
        #expect(ProtocolSelector.parseList("rdma,nvmeof").names == ["rdma", "nvmeof"])
        #expect(ProtocolSelector.parseList(" SHM , efa ").names == ["shm", "efa"])
        let messy = ProtocolSelector.parseList("tcp,shm,,shm")
        #expect(messy.names == ["shm", "tcp"])
        #expect(messy.notes.count == 3, "\(messy.notes)")
        #expect(ProtocolSelector.parseList("").names == ["tcp"])
        let environment = try fixture().environment
        #expect {
            try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy,warpdrive"), environment: environment)
        } throws: { error in
            "\(error)".contains("warpdrive") && "\(error)".contains("rdma") && "\(error)".contains("loopcopy")
        }
    }

    @Test("shm,loopcopy: both run beside tcp, the descriptor lists them, same-host peers get shm first, bytes move")
    func twoPluginsAndTCP() throws {
        let setup = try fixture()
        let (logger, _) = TestSupport.capturingLogger()
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "shm,loopcopy"), environment: setup.environment, logger: logger)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy,shm"), environment: setup.environment, logger: logger)
        defer { target.shutdown(); initiator.shutdown() }
        #expect(target.activeProtocols == ["shm", "loopcopy", "tcp"])
        #expect(initiator.activeProtocols == ["loopcopy", "shm", "tcp"])
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        local.fillPattern(seed: 5)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count), location: "cpu:0")
        let published = target.localDescriptor
        #expect(published.protocolName == "shm")
        #expect(published.extra["protocols"] == .array([.string("shm"), .string("loopcopy"), .string("tcp")]))
        // The second transport's fields ride under te_transports, at segment level and per buffer.
        #expect(published.extra["te_transports"]?["loopcopy"]?["fixture_pid"] != nil)
        #expect(published.buffers.first?.extra["te_transports"]?["loopcopy"]?["fixture_key"] == .array([.uint(7)]))
        let view = published.view(for: "loopcopy")
        #expect(view.protocolName == "loopcopy" && view.extra["fixture_pid"] != nil && view.buffers.first?.extra["fixture_key"] != nil)
        // A second transport's view holds its own keys only, never the first transport's.
        #expect(Set(view.extra.keys) == Set(published.extra["te_transports"]?["loopcopy"]?.objectValue?.keys ?? [:].keys), "\(view.extra.keys)")
        #expect(Set(view.buffers.first?.extra.keys ?? [:].keys) == ["fixture_key"])

        let handle = try initiator.openSegment(target.segmentName)
        let routes = try initiator.routes(segment: handle)
        #expect(routes.first?.order.map(\.protocolName) == ["shm", "loopcopy", "tcp"], "\(routes)")
        #expect(routes.first?.order.first?.why.contains("same host") == true)
        let hinted = try initiator.routes(segment: handle, hint: "loopcopy")
        #expect(hinted.first?.order.map(\.protocolName) == ["loopcopy", "shm", "tcp"])

        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 65536)
        try initiator.transferSync(.write, localAddress: local.address + 65536, segment: handle, remoteAddress: remote.address + 65536,
                                   length: 65536, transportHint: "loopcopy")
        let rest = (2..<16).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) * 65536, segment: handle,
                            remoteAddress: remote.address + UInt64(i) * 65536, length: 65536)
        }
        try initiator.transferBatchSync(rest, transportHint: "tcp")
        #expect(remote.equals(local, length: local.count))
    }

    @Test("a failing plugin path fails over to tcp, sync and batched, every byte verified; the path returns after its cooldown")
    func failoverToTCP() throws {
        let setup = try fixture(["MC_PATH_COOLDOWN_MS": "400"])
        let (logger, capture) = TestSupport.capturingLogger()
        let engines = try pair(setup, "loopcopy", size: 4 << 20, logger: logger)
        defer { engines.shutdown() }
        let (initiator, remote, local, handle) = (engines.initiator, engines.remote, engines.local, engines.handle)
        #expect(try initiator.routes(segment: handle).first?.order.map(\.protocolName) == ["loopcopy", "tcp"])

        // The path dies: every request on it fails from now on.
        _ = FileManager.default.createFile(atPath: setup.fault.path, contents: Data())
        local.fillPattern(seed: 11)
        let died = Date()
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        let firstOnFallback = Date().timeIntervalSince(died)
        print("failover: path death to first request completed on tcp: \(String(format: "%.0f", firstOnFallback * 1e6)) us")
        #expect(remote.equals(local, length: 4096))
        #expect(capture.messages(at: .warning).contains { $0.contains("loopcopy path to") && $0.contains("failing over to tcp") })
        let cooling = try initiator.routes(segment: handle).first!
        #expect(cooling.order.map(\.protocolName) == ["tcp", "loopcopy"], "\(cooling)")
        #expect(cooling.order.last?.why.contains("failed recently") == true)

        // A batch submitted while the path is cooling down starts on tcp; after the cooldown a
        // batch starts on the failing path again and every slice fails over.
        for round in 0..<2 {
            if round == 1 { usleep(500_000) }
            local.fillPattern(seed: UInt8(20 + round))
            let requests = (0..<64).map { i in
                TransferRequest(operation: .write, localAddress: local.address + UInt64(i) * 65536, segment: handle,
                                remoteAddress: remote.address + UInt64(i) * 65536, length: 65536)
            }
            let batch = try initiator.allocateBatch(capacity: 64)
            try initiator.submit(requests, to: batch)
            #expect(try initiator.wait(batch: batch, timeoutNs: 20_000_000_000))
            #expect(try initiator.statuses(batch: batch).allSatisfy { $0.state == .completed && $0.transferredBytes == 65536 })
            try initiator.freeBatch(batch)
            #expect(remote.equals(local, length: 64 * 65536), "round \(round)")
        }

        // Healed: after the cooldown the plugin carries requests again (a read, verified).
        try FileManager.default.removeItem(at: setup.fault)
        usleep(500_000)
        #expect(try initiator.routes(segment: handle).first?.order.map(\.protocolName) == ["loopcopy", "tcp"])
        let sink = TestBuffer(65536)
        try initiator.registerMemory(address: sink.address, length: UInt64(sink.count), location: "cpu:0")
        try initiator.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: remote.address, length: 65536)
        #expect(sink.equals(local, length: 65536))
    }

    @Test("a request with no path left fails naming every path tried and why")
    func everyPathFails() throws {
        let setup = try fixture()
        let engines = try pair(setup, "loopcopy")
        defer { engines.shutdown() }
        let (target, initiator, remote, local, handle) = (engines.target, engines.initiator, engines.remote, engines.local, engines.handle)
        _ = FileManager.default.createFile(atPath: setup.fault.path, contents: Data())
        target.shutdown()  // tcp to it is gone too
        #expect {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        } throws: { error in
            let text = "\(error)"
            return text.contains("every path failed") && text.contains("loopcopy:") && text.contains("tcp:")
        }
        let batch = try initiator.allocateBatch(capacity: 1)
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: 8192)], to: batch)
        #expect(try initiator.wait(batch: batch, timeoutNs: 20_000_000_000))
        let status = try initiator.status(batch: batch, task: 0)
        #expect(status.state == .failed)
        #expect(status.error?.contains("loopcopy:") == true && status.error?.contains("tcp:") == true, "\(status.error ?? "")")
    }

    @Test("a request the peer refuses is not failed over (it must not get past the refusal) and does not cool the path")
    func refusalIsNotFailover() throws {
        let setup = try fixture()
        let (logger, capture) = TestSupport.capturingLogger()
        let engines = try pair(setup, "loopcopy", logger: logger)
        defer { engines.shutdown() }
        let (target, initiator, remote, local, handle) = (engines.target, engines.initiator, engines.remote, engines.local, engines.handle)
        // Our cached descriptor still lists the buffer; the peer no longer has it registered.
        try target.unregisterMemory(address: remote.address)
        memset(remote.pointer, 0x11, remote.count)
        local.fillPattern(seed: 4)
        #expect {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096,
                                       transportHint: "tcp")
        } throws: { error in
            "\(error)".contains("ADDR_REJECTED") && !"\(error)".contains("every path failed")
        }
        let batch = try initiator.allocateBatch(capacity: 1)
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: 8192)], to: batch, transportHint: "tcp")
        #expect(try initiator.wait(batch: batch, timeoutNs: 10_000_000_000))
        let status = try initiator.status(batch: batch, task: 0)
        #expect(status.state == .failed && status.error?.contains("ADDR_REJECTED") == true, "\(status)")
        // Neither request reached the unregistered memory through the other transport.
        #expect(remote.bytes.allSatisfy { $0 == 0x11 })
        #expect(!capture.messages(at: .warning).contains { $0.contains("failing over") })
        #expect(try initiator.routes(segment: handle, hint: "tcp").first?.order.map(\.why).allSatisfy { !$0.contains("failed recently") } == true)
    }

    @Test("installTransport and uninstallTransport change what runs and what peers see, at run time")
    func installAndUninstall() throws {
        let setup = try fixture()
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "tcp"), environment: setup.environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "tcp"), environment: setup.environment)
        defer { target.shutdown(); initiator.shutdown() }
        let remote = TestBuffer(65536), local = TestBuffer(65536)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count), location: "cpu:0")
        try target.installTransport("loopcopy")
        try initiator.installTransport("loopcopy")
        try initiator.installTransport("loopcopy")  // a repeat does nothing
        try initiator.installTransport("tcp")
        #expect(target.activeProtocols == ["loopcopy", "tcp"] && initiator.activeProtocols == ["loopcopy", "tcp"])
        // Memory registered before the install is registered with the new transport too.
        #expect(target.localDescriptor.buffers.first?.extra["fixture_key"] != nil)
        let handle = try initiator.openSegment(target.segmentName)
        #expect(try initiator.routes(segment: handle).first?.order.map(\.protocolName) == ["loopcopy", "tcp"])
        local.fillPattern(seed: 3)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 65536)
        #expect(remote.equals(local, length: 65536))

        try initiator.uninstallTransport("loopcopy")
        #expect(initiator.activeProtocols == ["tcp"])
        #expect(try initiator.routes(segment: handle).first?.order.map(\.protocolName) == ["tcp"])
        local.fillPattern(seed: 4)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 65536)
        #expect(remote.equals(local, length: 65536))
        #expect(throws: EngineError.self) { try initiator.uninstallTransport("tcp") }
        #expect(throws: EngineError.self) { try initiator.uninstallTransport("loopcopy") }
        #expect(throws: EngineError.self) { try initiator.installTransport("rdma") }  // no plugin file here
    }

    @Test("a transport hint naming nothing installed warns once and routes as usual; strict mode refuses it")
    func unknownHint() throws {
        let setup = try fixture()
        let (logger, capture) = TestSupport.capturingLogger()
        let engines = try pair(setup, "tcp", logger: logger)
        defer { engines.shutdown() }
        let (target, initiator, remote, local, handle) = (engines.target, engines.initiator, engines.remote, engines.local, engines.handle)
        for _ in 0..<3 {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096, transportHint: "rdma")
        }
        #expect(capture.messages(at: .warning).filter { $0.contains("transport_hint 'rdma'") }.count == 1)
        var strict = setup.environment
        strict["MC_STRICT_PROTOCOL"] = "1"
        let strictEngine = try TransferEngine(configuration: EngineConfiguration(protocolName: "tcp"), environment: strict)
        defer { strictEngine.shutdown() }
        try strictEngine.registerMemory(address: local.address + 8192, length: 8192)
        let strictHandle = try strictEngine.openSegment(target.segmentName)
        #expect(throws: EngineError.self) {
            try strictEngine.transferSync(.write, localAddress: local.address + 8192, segment: strictHandle, remoteAddress: remote.address,
                                          length: 4096, transportHint: "rdma")
        }
    }

    @Test("uninstalling a transport while threads move data through it: no call reaches the destroyed instance, every transfer completes")
    func uninstallUnderLoad() throws {
        let setup = try fixture()
        let engines = try pair(setup, "loopcopy", size: 1 << 20)
        defer { engines.shutdown() }
        let (initiator, remote, local, handle) = (engines.initiator, engines.remote, engines.local, engines.handle)
        local.fillPattern(seed: 8)
        let failures = Failures()
        let stop = Date().addingTimeInterval(1.0)
        let uninstalled = ConditionLock<(done: Bool, roundsAfter: Int)>((false, 0))
        let uninstallDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            usleep(200_000)
            let began = Date()
            do { try initiator.uninstallTransport("loopcopy") } catch { failures.add("uninstall: \(error)") }
            print("uninstall under load took \(String(format: "%.1f", Date().timeIntervalSince(began) * 1000)) ms")
            uninstalled.withLock { $0.done = true }
            uninstallDone.signal()
        }
        DispatchQueue.concurrentPerform(iterations: 2) { worker in
            var rounds = 0
            while Date() < stop && rounds < 1_000_000 {
                uninstalled.withLock { if $0.done { $0.roundsAfter += 1 } }
                let at = UInt64(worker) * 65536
                do {
                    if rounds % 2 == 0 {
                        try initiator.transferSync(.write, localAddress: local.address + at, segment: handle, remoteAddress: remote.address + at, length: 65536)
                    } else {
                        try initiator.transferBatchSync([TransferRequest(operation: .write, localAddress: local.address + at, segment: handle,
                                                                         remoteAddress: remote.address + at, length: 65536)])
                    }
                } catch { failures.add("worker \(worker) round \(rounds): \(error)") }
                rounds += 1
            }
        }
        uninstallDone.wait()
        #expect(failures.all.isEmpty, "\(failures.all.prefix(3))")
        #expect(uninstalled.withLock { $0.roundsAfter } > 0, "no transfer ran after the uninstall")
        #expect(initiator.activeProtocols == ["tcp"])
        #expect(remote.equals(local, length: 2 * 65536))
    }

    @Test("a peer buffer naming its own protocol never gets device memory from a transport that cannot move it")
    func ownProtocolAndDeviceMemory() throws {
        let router = Router(cooldownNs: 1_000_000)
        let tcp = TCPTransport(channelSettings: .init(maxLanes: 1, connectTimeoutMs: 100, statusTimeoutMs: 100, laneIdleMs: 100),
                               useV2: true, inlineLimit: 1 << 20, logger: Logger(label: "test"))
        let target = Router.Target(segment: "peer", offered: ["tcp"], sameHost: false, unreachable: [:])
        let device = router.decide(installed: [tcp], target: target, remoteProtocol: "tcp", deviceMemory: true, hint: nil)
        #expect(device.order.isEmpty)
        #expect(device.skipped.contains { $0.protocolName == "tcp" && "\($0.reason)".contains("device memory") })
        let host = router.decide(installed: [tcp], target: target, remoteProtocol: "tcp", deviceMemory: false, hint: nil)
        #expect(host.order.map(\.transport.protocolName) == ["tcp"])
    }

    @Test("a missing protocol in a list falls back to the others with one warning; strict mode makes it an error")
    func missingMember() throws {
        let setup = try fixture()
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy,rdma"), environment: setup.environment, logger: logger)
        defer { engine.shutdown() }
        #expect(engine.activeProtocols == ["loopcopy", "tcp"])
        let warnings = capture.messages(at: .warning)
        #expect(warnings.count == 1 && warnings[0].contains("'rdma' is unavailable") && warnings[0].contains("loopcopy, tcp"), "\(warnings)")
        var strict = setup.environment
        strict["MC_STRICT_PROTOCOL"] = "1"
        #expect(throws: EngineError.self) {
            try TransferEngine(configuration: EngineConfiguration(protocolName: "loopcopy,rdma"), environment: strict)
        }
    }

    @Test("a request a plugin never gives back ends as TIMEOUT at MC_TRANSFER_TIMEOUT plus MC_FREE_BATCH_WAIT_MS, saying its buffer may still be in use")
    func deadline() throws {
        let setup = try fixture(["MC_TRANSFER_TIMEOUT": "5", "MC_FREE_BATCH_WAIT_MS": "1000"])
        let engines = try pair(setup, "loopcopy")
        defer { engines.shutdown() }
        let (initiator, remote, local, handle) = (engines.initiator, engines.remote, engines.local, engines.handle)
        _ = FileManager.default.createFile(atPath: setup.stall.path, contents: Data())
        let batch = try initiator.allocateBatch(capacity: 1)
        let started = Date()
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: 4096)], to: batch)
        #expect(try initiator.status(batch: batch, task: 0).state == .pending)
        #expect(try initiator.wait(batch: batch, timeoutNs: 15_000_000_000))
        let waited = Date().timeIntervalSince(started)
        let status = try initiator.status(batch: batch, task: 0)
        #expect(status.state == .timeout)
        #expect(status.error?.contains("may still be read or written") == true, "\(status)")
        #expect(waited >= 5.9 && waited < 9, "\(waited) s")
    }
}

/// Two engines in this process, a registered buffer on each, the target's segment opened.
struct EnginePair {
    let target: TransferEngine
    let initiator: TransferEngine
    let remote: TestBuffer
    let local: TestBuffer
    let handle: SegmentHandle

    init(protocolName: String, environment: [String: String], size: Int = 65536, logger: Logger? = nil) throws {
        target = try TransferEngine(configuration: EngineConfiguration(protocolName: protocolName), environment: environment)
        initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: protocolName), environment: environment,
                                       logger: logger ?? Logger(label: "transfer-engine"))
        remote = TestBuffer(size)
        local = TestBuffer(size)
        try target.registerMemory(address: remote.address, length: UInt64(size), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(size), location: "cpu:0")
        handle = try initiator.openSegment(target.segmentName)
    }

    func shutdown() {
        target.shutdown()
        initiator.shutdown()
    }
}
