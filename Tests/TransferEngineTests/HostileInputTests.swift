import Foundation
import Testing
@testable import TransferEngine

/// A raw-socket client sends malformed and out-of-range requests to an
/// engine's data and handshake ports. The engine must reject them, leave its
/// memory untouched, and keep serving well-formed peers.
@Suite("Hostile input on the data and handshake ports", .serialized)
struct HostileInputTests {
    final class Target {
        let engine: TransferEngine
        let buffer = TestBuffer(1 << 20, fill: 0x5A)
        let snapshot = TestBuffer(1 << 20, fill: 0x5A)
        init() throws {
            engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
            try engine.registerMemory(address: buffer.address, length: UInt64(buffer.count))
        }
        deinit { engine.shutdown() }

        func connectData() throws -> Socket {
            let socket = try Socket.connect(host: "127.0.0.1", port: engine.dataPort, timeoutMs: 2000)
            socket.setTimeouts(receiveMs: 5000, sendMs: 5000)
            return socket
        }

        /// Whether the target's memory is byte-identical to before.
        var untouched: Bool { buffer.equals(snapshot, length: buffer.count) }

        /// A well-formed v2 read of 16 bytes still succeeds.
        func stillServes() throws -> Bool {
            let socket = try connectData()
            let header = TCPWire.Header(size: 16, address: buffer.address, operation: .read, acknowledged: true).bytes
            try header.withUnsafeBytes { try socket.sendAll([$0]) }
            var status: UInt64 = 0
            try socket.receiveAll(&status, count: 8)
            var data = [UInt8](repeating: 0, count: 16)
            try data.withUnsafeMutableBytes { try socket.receiveAll($0.baseAddress!, count: 16) }
            return TCPWire.decodeStatusFrame(status) == 0 && data == [UInt8](repeating: 0x5A, count: 16)
        }
    }

    /// Sends a header (and optional payload) and returns what came back before the server closed.
    private func exchange(_ target: Target, header: TCPWire.Header, payload: [UInt8] = []) throws -> [UInt8] {
        let socket = try target.connectData()
        var bytes = header.bytes + payload
        _ = try? bytes.withUnsafeMutableBytes { try socket.sendAll([UnsafeRawBufferPointer($0)]) }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64)
        while let n = try? chunk.withUnsafeMutableBytes({ try socket.receiveSome($0.baseAddress!, count: 64) }), n > 0 {
            reply += chunk[0..<n]
        }
        return reply
    }

    @Test("out-of-range, overflowing and zero-length requests get ADDR_REJECTED (v2) or a closed connection (v1)")
    func rejectsBadRanges() throws {
        let target = try Target()
        let base = target.buffer.address
        let end = base + UInt64(target.buffer.count)
        let rejected = withUnsafeBytes(of: TCPWire.statusFrame(.addressRejected)) { Array($0) }
        let badHeaders: [TCPWire.Header] = [
            .init(size: 16, address: end - 8, operation: .write, acknowledged: true),        // runs past the end
            .init(size: 16, address: base - 16, operation: .write, acknowledged: true),      // before the start
            .init(size: UInt64.max - 10, address: base + 100, operation: .write, acknowledged: true),  // address + size overflows
            .init(size: 32, address: UInt64.max - 8, operation: .read, acknowledged: true),  // wraps around
            .init(size: 0, address: base, operation: .write, acknowledged: true),            // zero length (upstream rejects)
            .init(size: 8, address: 0x1000, operation: .read, acknowledged: true),           // unregistered memory
        ]
        for header in badHeaders {
            let reply = try exchange(target, header: header, payload: [UInt8](repeating: 0xFF, count: 16))
            #expect(reply == rejected, "\(header): got \(reply)")
        }
        // v1 framing: no status frame exists, the server just closes.
        let v1 = try exchange(target, header: .init(size: 16, address: end - 8, operation: .read, acknowledged: false))
        #expect(v1.isEmpty)
        #expect(target.untouched)
        #expect(try target.stillServes())
    }

    @Test("a refused read ends its connection without a reset: a peer that reads late still gets every answer queued before it")
    func refusalKeepsQueuedAnswers() throws {
        let target = try Target()
        let big = TestBuffer(8 << 20, fill: 0x3C)
        try target.engine.registerMemory(address: big.address, length: UInt64(big.count))
        let socket = try target.connectData()
        defer { socket.close() }
        socket.setBufferSizes(64 << 10)
        // Two 4 MiB reads, one outside every registered buffer, and one more the server never reads:
        // closing with it unread resets the connection, which can drop what is still queued to send.
        let headers = [TCPWire.Header(size: 4 << 20, address: big.address, operation: .read, acknowledged: true),
                       TCPWire.Header(size: 4 << 20, address: big.address + (4 << 20), operation: .read, acknowledged: true),
                       TCPWire.Header(size: 16, address: 0x10, operation: .read, acknowledged: true),
                       TCPWire.Header(size: 16, address: big.address, operation: .read, acknowledged: true)].flatMap(\.bytes)
        try headers.withUnsafeBytes { try socket.sendAll([$0]) }
        usleep(300_000)  // the server fills its send buffer and waits for this side to read
        let data = TestBuffer(8 << 20)
        var statuses = [UInt64](repeating: 0, count: 3)
        try statuses.withUnsafeMutableBufferPointer { frames in
            try socket.receiveAll([UnsafeMutableRawBufferPointer(start: frames.baseAddress, count: 8),
                                   UnsafeMutableRawBufferPointer(start: data.pointer, count: 4 << 20),
                                   UnsafeMutableRawBufferPointer(start: frames.baseAddress! + 1, count: 8),
                                   UnsafeMutableRawBufferPointer(start: data.pointer + (4 << 20), count: 4 << 20),
                                   UnsafeMutableRawBufferPointer(start: frames.baseAddress! + 2, count: 8)])
        }
        #expect(statuses.map(TCPWire.decodeStatusFrame) == [TCPWire.Status.ok.rawValue, TCPWire.Status.ok.rawValue, TCPWire.Status.addressRejected.rawValue])
        #expect(data.equals(big, length: big.count))
        var byte: UInt8 = 0
        #expect(try socket.receiveSome(&byte, count: 1) == 0, "the connection ends after the refusal")
        #expect(try target.stillServes())
    }

    @Test("unknown opcodes on the data port are refused (v2: a rejection status), never served as a READ of registered memory")
    func unknownOpcodes() throws {
        let target = try Target()
        for opcode: UInt8 in [2, 0x7F, 0x82, 0xFF] {
            var bytes = TCPWire.Header(size: 64, address: target.buffer.address, operation: .read, acknowledged: false).bytes
            bytes[16] = opcode
            let socket = try target.connectData()
            try bytes.withUnsafeBytes { try socket.sendAll([$0]) }
            var reply: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 256)
            while let n = try? chunk.withUnsafeMutableBytes({ try socket.receiveSome($0.baseAddress!, count: 256) }), n > 0 { reply += chunk[0..<n] }
            socket.close()
            let rejection = withUnsafeBytes(of: TCPWire.statusFrame(.addressRejected)) { Array($0) }
            #expect(reply == (opcode & 0x80 != 0 ? rejection : []), "opcode 0x\(String(opcode, radix: 16)): \(reply.count) bytes back")
        }
        #expect(target.untouched)
        #expect(try target.stillServes())
    }

    @Test("a peer streaming small acknowledged writes without reading gets its acknowledgements in bounded batches")
    func pipelinedAcknowledgements() throws {
        let target = try Target()
        let socket = try target.connectData()
        defer { socket.close() }
        // 20 000 one-byte v2 writes in one stream, the last payload byte held back: the server
        // always has more input queued, and used to keep every acknowledgement until it had none.
        let count = 20_000
        var stream: [UInt8] = []
        stream.reserveCapacity(count * (TCPWire.headerSize + 1))
        for i in 0..<count {
            stream += TCPWire.Header(size: 1, address: target.buffer.address + 8192 + UInt64(i % 4096), operation: .write, acknowledged: true).bytes
            stream.append(0x11)
        }
        try stream.withUnsafeBytes { try socket.sendAll([UnsafeRawBufferPointer(rebasing: $0.dropLast())]) }
        var received = 0
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        let deadline = Date().addingTimeInterval(5)
        socket.setTimeouts(receiveMs: 200, sendMs: 5000)
        while Date() < deadline, received < (count / TCPDataServer.maxPendingAcks) * TCPDataServer.maxPendingAcks * 8 {
            guard let n = try? chunk.withUnsafeMutableBytes({ try socket.receiveSome($0.baseAddress!, count: $0.count) }), n > 0 else { continue }
            received += n
        }
        #expect(received >= (count / TCPDataServer.maxPendingAcks) * TCPDataServer.maxPendingAcks * 8,
                "\(received / 8) acknowledgements arrived while the last write was incomplete")
        try [UInt8(0x11)].withUnsafeBytes { try socket.sendAll([$0]) }
        #expect(try target.stillServes())
    }

    @Test("the data port closes idle connections after MC_TCP_IDLE_TIMEOUT_SEC and limits connections per address")
    func dataPortIdleAndPerAddress() throws {
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(),
                                        environment: TestSupport.cleanEnvironment(["MC_TCP_IDLE_TIMEOUT_SEC": "1",
                                                                                   "MC_TCP_MAX_CONNECTIONS_PER_ADDRESS": "4"]), logger: logger)
        defer { engine.shutdown() }
        var byte: UInt8 = 0
        let idle = try Socket.connect(host: "127.0.0.1", port: engine.dataPort, timeoutMs: 2000)
        idle.setTimeouts(receiveMs: 5000, sendMs: 1000)
        let started = Date()
        #expect((try? idle.receiveSome(&byte, count: 1)) == 0, "the idle connection was not closed")
        #expect(Date().timeIntervalSince(started) < 4)
        idle.close()
        usleep(100_000)
        // Four from one address are served; the fifth is closed at once, with one warning.
        var open: [Socket] = []
        for _ in 0..<4 { open.append(try Socket.connect(host: "127.0.0.1", port: engine.dataPort, timeoutMs: 2000)) }
        usleep(100_000)
        let fifth = try Socket.connect(host: "127.0.0.1", port: engine.dataPort, timeoutMs: 2000)
        fifth.setTimeouts(receiveMs: 2000, sendMs: 1000)
        #expect((try? fifth.receiveSome(&byte, count: 1)) == 0)
        #expect(capture.messages(at: .warning).contains { $0.contains("4 connections from 127.0.0.1 already open") })
        open.forEach { $0.close() }
    }

    @Test("memory registered as device memory (cuda:N) is never served over TCP: the CPU must not dereference it")
    func deviceMemoryNotServed() throws {
        let target = try Target()
        let device = TestBuffer(4096, fill: 0x5a)  // host memory labelled cuda:0 stands in for a device pointer
        try target.engine.registerMemory(address: device.address, length: 4096, location: "cuda:0")
        let rejected = withUnsafeBytes(of: TCPWire.statusFrame(.addressRejected)) { Array($0) }
        for operation in [TCPWire.Operation.read, .write] {
            let reply = try exchange(target, header: .init(size: 16, address: device.address, operation: operation, acknowledged: true),
                                     payload: operation == .write ? [UInt8](repeating: 0xFF, count: 16) : [])
            #expect(reply == rejected, "\(operation): got \(reply)")
        }
        #expect(device.bytes.allSatisfy { $0 == 0x5a })
        #expect(try target.stillServes())
    }

    @Test("managed buffers at a GPU location come only from a plugin that allocates device memory, never from the heap")
    func managedDeviceMemoryRefused() throws {
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path, "MC_STRICT_PROTOCOL": "1"])
        for protocolName in ["tcp", "shm"] {  // no allocator; a host-memory allocator (memfds)
            let engine = try TransferEngine(configuration: EngineConfiguration(protocolName: protocolName), environment: environment)
            defer { engine.shutdown() }
            do {
                _ = try engine.allocateManagedBuffer(length: 1 << 20, location: "cuda:0")
                Issue.record("\(protocolName): a managed buffer at cuda:0 was handed out")
            } catch EngineError.invalidArgument(let text) {
                #expect(text.contains("managed buffers at cuda:0 need a transport that allocates device memory"), "\(text)")
                #expect(text.contains("protocol \(protocolName) does not"), "\(text)")
            }
            #expect(try engine.descriptor(of: engine.openSegment(engine.segmentName)).buffers.isEmpty, "\(protocolName): nothing registered")
            let host = try engine.allocateManagedBuffer(length: 1 << 20, location: "cpu:0")
            try engine.freeManagedBuffer(address: host)
        }
    }

    @Test("truncated headers and payloads leave memory consistent and the server serving")
    func truncated() throws {
        let target = try Target()
        // Half a header, then close.
        do {
            let socket = try target.connectData()
            let half = Array(TCPWire.Header(size: 16, address: target.buffer.address, operation: .write, acknowledged: true).bytes.prefix(11))
            try half.withUnsafeBytes { try socket.sendAll([$0]) }
            socket.close()
        }
        // A write that promises 64 KiB and delivers 10 bytes, then closes.
        do {
            let socket = try target.connectData()
            let bytes = TCPWire.Header(size: 65536, address: target.buffer.address + 4096, operation: .write, acknowledged: true).bytes + [UInt8](repeating: 0x11, count: 10)
            try bytes.withUnsafeBytes { try socket.sendAll([$0]) }
            socket.close()
        }
        usleep(100_000)
        // Bytes outside the announced range are untouched; the server keeps serving.
        #expect(target.buffer.equals(target.snapshot, offset: 0, otherOffset: 0, length: 4096))
        #expect(target.buffer.equals(target.snapshot, offset: 4096 + 65536, otherOffset: 4096 + 65536, length: target.buffer.count - 4096 - 65536))
        #expect(try target.stillServes())
    }

    @Test("a peer trickling a write payload cannot hold the registration: unregister finishes within the payload deadline")
    func tricklingPeer() throws {
        let environment = TestSupport.cleanEnvironment(["MC_TCP_STATUS_TIMEOUT_SEC": "1"])
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: environment)
        defer { engine.shutdown() }
        let buffer = TestBuffer(1 << 20)
        try engine.registerMemory(address: buffer.address, length: UInt64(buffer.count))
        let socket = try Socket.connect(host: "127.0.0.1", port: engine.dataPort, timeoutMs: 2000)
        let header = TCPWire.Header(size: 65536, address: buffer.address, operation: .write, acknowledged: true).bytes
        try header.withUnsafeBytes { try socket.sendAll([$0]) }
        let closedAfter = LockedCounter()
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            // One byte every 200 ms: each receive succeeds, so only a total deadline stops it.
            let start = Date()
            var byte: UInt8 = 1
            while Date().timeIntervalSince(start) < 8 {
                if (try? socket.sendAll(&byte, count: 1)) == nil { break }
                usleep(200_000)
            }
            for _ in 0..<Int(Date().timeIntervalSince(start) * 10) { closedAfter.increment() }
            done.signal()
        }
        usleep(300_000)
        let started = Date()
        try engine.unregisterMemory(address: buffer.address)
        let waited = Date().timeIntervalSince(started)
        #expect(waited < 3, "unregister waited \(waited) s behind a trickling peer")
        _ = done.wait(timeout: .now() + 10)
        #expect(closedAfter.value < 60, "the server kept reading the trickle for \(Double(closedAfter.value) / 10) s")
    }

    @Test("a peer inside one buffer while it is unregistered holds up neither other peers nor local planning")
    func unregisterDoesNotFreezeOthers() throws {
        let target = try Target()
        let slow = TestBuffer(1 << 20)
        try target.engine.registerMemory(address: slow.address, length: UInt64(slow.count))
        let trickler = try target.connectData()
        let header = TCPWire.Header(size: 65536, address: slow.address, operation: .write, acknowledged: true).bytes
        try header.withUnsafeBytes { try trickler.sendAll([$0]) }
        let stop = LockedCounter()
        DispatchQueue.global().async {
            var byte: UInt8 = 1
            while stop.value == 0, (try? trickler.sendAll(&byte, count: 1)) != nil { usleep(100_000) }
        }
        defer { stop.increment() }
        usleep(200_000)
        let unregistered = DispatchSemaphore(value: 0)
        let waited = LockedCounter()
        let engine = target.engine, address = slow.address
        DispatchQueue.global().async {
            let started = Date()
            _ = try? engine.unregisterMemory(address: address)
            for _ in 0..<Int(Date().timeIntervalSince(started) * 1000) { waited.increment() }
            unregistered.signal()
        }
        usleep(200_000)  // the unregister now waits for the trickler
        // Another peer's read of another buffer, and local planning, go on meanwhile.
        var slowest = 0.0
        for _ in 0..<5 {
            let started = Date()
            #expect(try target.stillServes())
            _ = try target.engine.descriptor(of: 0)
            slowest = max(slowest, Date().timeIntervalSince(started))
        }
        #expect(slowest < 0.5, "served others in \(slowest) s while an unregister waited")
        #expect(unregistered.wait(timeout: .now() + 10) == .success)
        // The grace period (2 s), then the trickler's connection is shut down and the unregister ends.
        #expect(waited.value < 4000, "unregister took \(waited.value) ms")
        #expect(target.untouched)
    }
}
