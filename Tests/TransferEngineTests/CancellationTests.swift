import Foundation
import Testing
@testable import TransferEngine

/// Per-batch deadlines and freeing batches with requests in flight. The fixture plugin's stall
/// switch (MC_FIXTURE_STALL_FILE) makes requests that never complete.
@Suite("Deadlines and cancellation", .serialized)
struct CancellationTests {
    @Test("a batch's own timeout ends a request that never completes as TIMEOUT; freeing it waits for the transport, then says it cannot")
    func batchTimeoutAndStuckFree() throws {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_loopcopy.so", in: directory)
        let stall = directory.appendingPathComponent("stall")
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path, "MC_FIXTURE_STALL_FILE": stall.path,
                                                        "MC_FREE_BATCH_WAIT_MS": "300"])
        let engines = try EnginePair(protocolName: "loopcopy", environment: environment)
        defer { engines.shutdown() }
        let (initiator, remote, local, handle) = (engines.initiator, engines.remote, engines.local, engines.handle)
        _ = FileManager.default.createFile(atPath: stall.path, contents: Data())
        #expect(throws: EngineError.self) { try initiator.allocateBatch(capacity: 1, timeoutNs: 0) }
        let batch = try initiator.allocateBatch(capacity: 2, timeoutNs: 300_000_000)
        let started = Date()
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: 4096)], to: batch)
        #expect(try initiator.wait(batch: batch, timeoutNs: 10_000_000_000))
        let waited = Date().timeIntervalSince(started)
        #expect(try initiator.status(batch: batch, task: 0).state == .timeout)
        #expect(waited >= 0.29 && waited < 2, "\(waited) s")
        // The plugin still holds the request: freeing waits MC_FREE_BATCH_WAIT_MS, then refuses.
        #expect {
            try initiator.freeBatch(batch)
        } throws: { error in
            "\(error)".contains("still inside transports")
        }
        // A second batch in flight when freed: its request reads canceled.
        let second = try initiator.allocateBatch(capacity: 1)
        try initiator.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: remote.address,
                                              length: 4096)], to: second)
        #expect(throws: EngineError.self) { try initiator.freeBatch(second) }
        #expect(try initiator.status(batch: second, task: 0).state == .canceled)
    }

    @Test("freeing a batch of reads in flight over tcp cancels what has not started and returns only when nothing more can land")
    func freeInFlightOverTCP() throws {
        let target = try ServeProcess(bufferSize: "64MiB")
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        let local = TestBuffer(64 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segment)
        for round in 0..<5 {
            let batch = try engine.allocateBatch(capacity: 64)
            let requests = (0..<64).map { i in
                TransferRequest(operation: .read, localAddress: local.address + UInt64(i) << 20, segment: handle,
                                remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
            }
            try engine.submit(requests, to: batch)
            usleep(UInt32(round) * 2000)
            try engine.freeBatch(batch)
            // Nothing of the freed batch may land now: fill with a sentinel and look again later.
            memset(local.pointer, 0xee, local.count)
            usleep(100_000)
            #expect(local.bytes.allSatisfy { $0 == 0xee }, "round \(round): a canceled read landed after freeBatch returned")
            #expect(throws: EngineError.self) { try engine.statuses(batch: batch) }
        }
        // The engine still works.
        try engine.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 4096)
    }

    @Test("a batched read whose bytes are still arriving at its deadline ends as TIMEOUT at the deadline, and nothing of it lands later (tcp)")
    func lateBytesNeverLandBatched() throws {
        let peer = try DelayedDataPeer(delay: 1.5)
        defer { peer.stop() }
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        let local = TestBuffer(1 << 20)
        memset(local.pointer, 0, local.count)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(peer.segment)
        let batch = try engine.allocateBatch(capacity: 1, timeoutNs: 400_000_000)
        let started = Date()
        try engine.submit([TransferRequest(operation: .read, localAddress: local.address, segment: handle,
                                           remoteAddress: DelayedDataPeer.bufferAddress, length: 256 << 10)], to: batch)
        #expect(try engine.wait(batch: batch, timeoutNs: 10_000_000_000))
        let waited = Date().timeIntervalSince(started)
        let status = try engine.status(batch: batch, task: 0)
        #expect(status.state == .timeout, "\(status)")
        #expect(status.error?.contains("deadline") == true, "\(status)")
        #expect(waited >= 0.39 && waited < 1.2, "TIMEOUT after \(waited) s (deadline 0.4 s, late bytes at 1.5 s)")
        #expect(local.bytes.contains(0x11), "the first half arrived before the deadline")
        // The caller was told the request is over: the late half must never land.
        Thread.sleep(forTimeInterval: 1.6)
        #expect(!local.bytes.contains(0x22), "bytes of a timed-out read landed after TIMEOUT was reported")
        try engine.freeBatch(batch)
    }

    @Test("a batched write to a peer that stopped reading ends as TIMEOUT at its deadline, not later (tcp)")
    func stalledWriteEndsAtDeadline() throws {
        let peer = try DelayedDataPeer(delay: 3, readsWrites: false)
        defer { peer.stop() }
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        // 8 MiB: more than the peer's receive window and a lane's send buffer hold, so the lanes'
        // sends block until the deadline.
        let local = TestBuffer(8 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(peer.segment)
        let batch = try engine.allocateBatch(capacity: 1, timeoutNs: 400_000_000)
        let started = Date()
        try engine.submit([TransferRequest(operation: .write, localAddress: local.address, segment: handle,
                                           remoteAddress: DelayedDataPeer.bufferAddress, length: UInt64(local.count))], to: batch)
        #expect(try engine.wait(batch: batch, timeoutNs: 10_000_000_000))
        let waited = Date().timeIntervalSince(started)
        let status = try engine.status(batch: batch, task: 0)
        #expect(status.state == .timeout, "\(status)")
        // A failed write run waited 200 ms for status frames past the deadline before it reported.
        #expect(waited >= 0.39 && waited < 0.58, "TIMEOUT after \(waited) s (deadline 0.4 s)")
        try engine.freeBatch(batch)
    }

    @Test("a failed write run waits for status frames at most 200 ms and never past its deadline")
    func statusWaitStopsAtDeadline() {
        #expect(TCPChannel.statusWaitMs(until: nil) == 200)
        #expect(TCPChannel.statusWaitMs(until: 1_000_000_000, now: 500_000_000) == 200)
        #expect(TCPChannel.statusWaitMs(until: 1_000_000_000, now: 950_000_000) == 51)
        #expect(TCPChannel.statusWaitMs(until: 1_000_000_000, now: 1_000_000_000) == 1)
        #expect(TCPChannel.statusWaitMs(until: 1_000_000_000, now: 2_000_000_000) == 1)
    }

    @Test("a synchronous read whose bytes are still arriving at MC_TRANSFER_TIMEOUT throws a timeout, and nothing of it lands later (tcp)")
    func lateBytesNeverLandSync() throws {
        let peer = try DelayedDataPeer(delay: 5.6)
        defer { peer.stop() }
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment(["MC_TRANSFER_TIMEOUT": "5"]))
        defer { engine.shutdown() }
        let local = TestBuffer(64 << 10)
        memset(local.pointer, 0, local.count)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(peer.segment)
        let started = Date()
        #expect {
            try engine.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: DelayedDataPeer.bufferAddress, length: 4096)
        } throws: { error in
            if case EngineError.timeout = error { return true }
            Issue.record("expected a timeout, got \(error)")
            return false
        }
        let waited = Date().timeIntervalSince(started)
        #expect(waited >= 4.9 && waited < 5.5, "\(waited) s")
        Thread.sleep(forTimeInterval: 0.9)
        #expect(!local.bytes.contains(0x22), "bytes of a timed-out synchronous read landed after it threw")
    }
}
