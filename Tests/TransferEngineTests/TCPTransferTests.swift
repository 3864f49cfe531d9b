import Foundation
import Testing
@testable import TransferEngine

/// TCP transfers between this test process and a `transfer-engine serve`
/// child process, over real loopback sockets, with every byte verified.
@Suite("TCP transport between two processes", .serialized)
struct TCPTransferTests {
    private func makeEngine() throws -> TransferEngine {
        try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
    }

    @Test("writes then reads back every size from 1 B to 64 MiB; the peer's memory holds exactly the bytes written")
    func sizes() throws {
        let target = try ServeProcess(bufferSize: "160MiB")
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let source = TestBuffer(64 << 20)
        let sink = TestBuffer(64 << 20)
        try engine.registerMemory(address: source.address, length: UInt64(source.count))
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count))
        let handle = try engine.openSegment(target.segment)
        var sizes: [Int] = [1, 7, 24, 4095, 4096, 65537]
        var size = 1 << 17
        while size <= 64 << 20 { sizes.append(size); size <<= 2 }
        sizes.append(64 << 20)
        for (index, size) in sizes.enumerated() {
            source.fillPattern(seed: UInt8(index))
            memset(sink.pointer, 0xEE, size)
            let remote = target.bufferAddress + UInt64(index * 4099 % 65536)  // unaligned remote offsets too
            try engine.transferSync(.write, localAddress: source.address, segment: handle, remoteAddress: remote, length: UInt64(size))
            try engine.transferSync(.read, localAddress: sink.address, segment: handle, remoteAddress: remote, length: UInt64(size))
            #expect(sink.equals(source, length: size), "size \(size)")
        }
    }

    @Test("batches of mixed reads and writes complete with per-task status")
    func batches() throws {
        let target = try ServeProcess(bufferSize: "64MiB")
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let local = TestBuffer(32 << 20)
        let back = TestBuffer(32 << 20)
        local.fillPattern(seed: 3)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        try engine.registerMemory(address: back.address, length: UInt64(back.count))
        let handle = try engine.openSegment(target.segment)
        let block: UInt64 = 256 << 10
        let count = Int(UInt64(local.count) / block)
        let batch = try engine.allocateBatch(capacity: count)
        try engine.submit((0..<count).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) * block, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) * block, length: block)
        }, to: batch)
        #expect(try engine.wait(batch: batch, timeoutNs: 60_000_000_000))
        let statuses = try engine.statuses(batch: batch)
        #expect(statuses.count == count && statuses.allSatisfy { $0.state == .completed && $0.transferredBytes == block })
        try engine.freeBatch(batch)
        #expect(throws: EngineError.invalidBatch(batch)) { try engine.freeBatch(batch) }

        let reads = (0..<count).map { i in
            TransferRequest(operation: .read, localAddress: back.address + UInt64(i) * block, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) * block, length: block)
        }
        try engine.transferBatchSync(reads)
        #expect(back.equals(local, length: local.count))
    }

    @Test("concurrent submitters on several threads each get their own bytes back")
    func concurrentSubmitters() throws {
        let target = try ServeProcess(bufferSize: "64MiB")
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let threads = 4
        let span = 8 << 20
        let buffers = (0..<threads).map { _ in (TestBuffer(span), TestBuffer(span)) }
        for (out, back) in buffers {
            try engine.registerMemory(address: out.address, length: UInt64(span))
            try engine.registerMemory(address: back.address, length: UInt64(span))
        }
        let handle = try engine.openSegment(target.segment)
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let (out, back) = buffers[t]
            out.fillPattern(seed: UInt8(40 + t))
            let remote = target.bufferAddress + UInt64(t * span)
            do {
                for round in 0..<8 {
                    let block = UInt64(span / 8)
                    let offset = UInt64(round) * block
                    try engine.transferSync(.write, localAddress: out.address + offset, segment: handle, remoteAddress: remote + offset, length: block)
                }
                try engine.transferBatchSync([TransferRequest(operation: .read, localAddress: back.address, segment: handle, remoteAddress: remote, length: UInt64(span))])
                if !back.equals(out, length: span) { failures.increment() }
            } catch {
                failures.increment()
            }
        }
        #expect(failures.value == 0)
    }

    @Test("out-of-range requests are refused locally before anything is sent")
    func localValidation() throws {
        let target = try ServeProcess(bufferSize: "8MiB")
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let local = TestBuffer(1 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segment)
        #expect(throws: EngineError.self) {  // remote range past the peer's buffer
            try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress + target.bufferLength - 10, length: 100)
        }
        #expect(throws: EngineError.self) {  // local range not registered
            try engine.transferSync(.read, localAddress: local.address + UInt64(local.count) - 10, segment: handle, remoteAddress: target.bufferAddress, length: 100)
        }
        let batch = try engine.allocateBatch(capacity: 2)
        #expect(throws: EngineError.self) {  // one bad request: nothing is submitted
            try engine.submit([
                TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 10),
                TransferRequest(operation: .write, localAddress: local.address, segment: handle, remoteAddress: 0x10, length: 10),
            ], to: batch)
        }
        #expect(try engine.statuses(batch: batch).isEmpty)
        #expect(throws: EngineError.self) { try engine.openSegment("127.0.0.1:1") }
    }

    @Test("a peer that dies mid-batch fails the remaining tasks and nothing hangs")
    func peerDiesMidBatch() throws {
        let target = try ServeProcess(bufferSize: "256MiB")
        let engine = try makeEngine()
        defer { engine.shutdown() }
        let local = TestBuffer(256 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segment)
        let block: UInt64 = 1 << 20
        let count = 256
        let batch = try engine.allocateBatch(capacity: count * 4)
        for round in 0..<4 {
            try engine.submit((0..<count).map { i in
                TransferRequest(operation: round % 2 == 0 ? .write : .read, localAddress: local.address + UInt64(i) * block, segment: handle,
                                remoteAddress: target.bufferAddress + UInt64(i) * block, length: block)
            }, to: batch)
        }
        usleep(20_000)
        target.kill()
        let started = Date()
        #expect(try engine.wait(batch: batch, timeoutNs: 60_000_000_000), "tasks still pending after the peer died")
        #expect(Date().timeIntervalSince(started) < 60)
        let statuses = try engine.statuses(batch: batch)
        #expect(statuses.contains { $0.state == .failed }, "the peer died, some task must fail")
        #expect(statuses.allSatisfy { $0.state == .failed || $0.state == .completed })
        #expect(statuses.first { $0.state == .failed }?.error?.isEmpty == false)
        // New work to the dead peer fails promptly too.
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 4096)
        }
    }

    @Test("a read the peer refuses mid-run fails with the ones behind it on its connection; the answers before it arrive whole, and later runs complete")
    func readRefusedMidRun() throws {
        let target = try makeEngine()
        defer { target.shutdown() }
        let served = TestBuffer(48 << 20)
        served.fillPattern(seed: 9)
        let doomed = TestBuffer(1 << 20)
        try target.registerMemory(address: served.address, length: UInt64(served.count))
        try target.registerMemory(address: doomed.address, length: UInt64(doomed.count))
        // One lane, so its runs (32 reads of 512 KiB each) follow each other on one connection.
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment(["MC_TCP_LANES_PER_PEER": "1"]))
        defer { engine.shutdown() }
        let local = TestBuffer(48 << 20)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segmentName)
        try target.unregisterMemory(address: doomed.address)  // the initiator's copy of the descriptor still lists it
        let block = 512 << 10
        // In the second run: the server refuses it with the rest of that run's headers unread. Closing
        // then would reset the connection and drop the data still queued for the reads before it.
        let refused = 62
        let requests = (0..<96).map { i in
            TransferRequest(operation: .read, localAddress: local.address + UInt64(i * block), segment: handle,
                            remoteAddress: i == refused ? doomed.address : served.address + UInt64(i * block), length: UInt64(block))
        }
        let batch = try engine.allocateBatch(capacity: requests.count)
        try engine.submit(requests, to: batch)
        #expect(try engine.wait(batch: batch, timeoutNs: 60_000_000_000))
        let statuses = try engine.statuses(batch: batch)
        #expect(statuses[refused].state == .failed && statuses[refused].error?.contains("ADDR_REJECTED") == true, "\(statuses[refused])")
        #expect(statuses[..<refused].allSatisfy { $0.state == .completed }, "\(statuses[..<refused].filter { $0.state != .completed }.prefix(2))")
        #expect(statuses[(refused + 1)...].contains { $0.error?.contains("connection lost") == true }, "the refusal ended the connection")
        #expect(statuses[64...].allSatisfy { $0.state == .completed }, "the next run, on a new connection")
        for i in statuses.indices where statuses[i].state == .completed {
            #expect(local.equals(served, offset: i * block, otherOffset: i * block, length: block), "read \(i)")
        }
    }

    @Test("notifications and probes travel over the handshake port")
    func notifyAndProbe() throws {
        let receiver = try makeEngine()
        let sender = try makeEngine()
        defer { receiver.shutdown(); sender.shutdown() }
        try sender.probe(segmentName: receiver.segmentName)
        let handle = try sender.openSegment(receiver.segmentName)
        try sender.sendNotification(TransferNotification(name: "kv-block-17", message: "ready"), to: handle)
        #expect(receiver.takeNotifications() == [TransferNotification(name: "kv-block-17", message: "ready")])
        #expect(receiver.takeNotifications().isEmpty)
        #expect(throws: (any Error).self) { try sender.probe(segmentName: "127.0.0.1:1") }
    }

    @Test("a peer's later registrations are picked up by refreshing its descriptor")
    func refreshAfterRegistration() throws {
        let target = try makeEngine()
        let initiator = try makeEngine()
        defer { target.shutdown(); initiator.shutdown() }
        let first = TestBuffer(4096), second = TestBuffer(4096, fill: 0x42), local = TestBuffer(4096)
        try target.registerMemory(address: first.address, length: 4096)
        try initiator.registerMemory(address: local.address, length: 4096)
        let handle = try initiator.openSegment(target.segmentName)
        #expect(try initiator.openSegment(target.segmentName) == handle)
        try target.registerMemory(address: second.address, length: 4096)
        try initiator.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: second.address, length: 4096)
        #expect(local.equals(second, length: 4096))
        // After unregistering, the target refuses the range even for a client with a stale descriptor.
        try target.unregisterMemory(address: second.address)
        #expect(throws: EngineError.self) {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: second.address, length: 4096)
        }
    }
}

/// Whether this host can bind the IPv6 loopback address.
let ipv6LoopbackAvailable: Bool = (try? Socket.listen(host: "::1", port: 0)) != nil

@Suite("TCP over IPv6 loopback", .enabled(if: ipv6LoopbackAvailable))
struct IPv6Tests {
    @Test("segment names bracket IPv6 hosts and transfers work over ::1")
    func ipv6() throws {
        let target = try TransferEngine(configuration: EngineConfiguration(localHostname: "::1"), environment: TestSupport.cleanEnvironment())
        let initiator = try TransferEngine(configuration: EngineConfiguration(localHostname: "[::1]"), environment: TestSupport.cleanEnvironment())
        defer { target.shutdown(); initiator.shutdown() }
        #expect(target.segmentName.hasPrefix("[::1]:"))
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        local.fillPattern(seed: 6)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count))
        try initiator.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: UInt64(local.count))
        #expect(remote.equals(local, length: local.count))
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func increment() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}

/// Shutting an engine down ends its lanes' transfers before it returns: memory the caller frees
/// next is never written afterwards (a lane once kept receiving a large read after shutdown).
@Suite("Shutdown with transfers in flight")
struct ShutdownInFlightTests {
    @Test("shutdown during a 256 MiB batched read: no byte lands in local memory after it returns")
    func shutdownStopsLanes() throws {
        let target = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { target.shutdown() }
        let size = 256 << 20
        let remote = TestBuffer(size)
        remote.fillPattern(seed: 9)
        try target.registerMemory(address: remote.address, length: UInt64(size))
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        let local = TestBuffer(size)
        try engine.registerMemory(address: local.address, length: UInt64(size))
        let handle = try engine.openSegment(target.segmentName)
        let batch = try engine.allocateBatch(capacity: 4)
        let quarter = UInt64(size / 4)
        try engine.submit((0..<4).map { i in
            TransferRequest(operation: .read, localAddress: local.address + UInt64(i) * quarter, segment: handle,
                            remoteAddress: remote.address + UInt64(i) * quarter, length: quarter)
        }, to: batch)
        usleep(20_000)
        engine.shutdown()
        func landed() -> Int {
            var count = 0
            let bytes = local.bytes
            for i in stride(from: 0, to: size, by: 4096) where bytes[i] != 0 { count += 1 }
            return count
        }
        let atShutdown = landed()
        usleep(300_000)
        #expect(landed() == atShutdown, "pages landed after shutdown returned (\(atShutdown) at shutdown)")
        #expect(atShutdown < size / 4096, "the read finished before shutdown; the test proved nothing")
    }
}
