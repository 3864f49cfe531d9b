import Foundation
import Logging
import Testing
@testable import TransferEngine

/// The cxl pool's shared table against what real pools meet: unregistering while peers hold a
/// descriptor, descriptors aimed at the table, a setup cut short, a header that does not match
/// while engines use the pool, and engines in other pid namespaces.
@Suite("cxl pool table: revocation, recovery, owners", .serialized, .enabled(if: CXLPluginBuild.present, "libtransport_cxl.so was not built"))
struct CXLPoolTableTests {
    /// Byte offsets of the table's words (layout 2: 8 header words, 1024 epochs, two words per chunk).
    static func ownerWordOffset(_ chunk: Int) -> off_t { off_t(8 * (8 + 1024 + 2 * chunk)) }
    static let chunkSize = 2 << 20

    static func makePool(_ size: Int, firstWord: UInt64 = 0) throws -> String {
        let path = "/dev/shm/te-test-cxlt-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o600)
        guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else { throw TestFailure("cannot create \(path)") }
        close(fd)
        if firstWord != 0 { try writeWord(path, at: 0, firstWord) }
        return path
    }

    static func readWord(_ path: String, at offset: off_t) throws -> UInt64 {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var word: UInt64 = 0
        guard fd >= 0, pread(fd, &word, 8, offset) == 8 else { throw TestFailure("cannot read \(path)") }
        return word
    }

    static func writeWord(_ path: String, at offset: off_t, _ value: UInt64) throws {
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        var word = value
        guard fd >= 0, pwrite(fd, &word, 8, offset) == 8 else { throw TestFailure("cannot write \(path)") }
    }

    /// The first chunk some engine owns, and its owner word.
    static func firstOwnedChunk(_ path: String) throws -> (chunk: Int, owner: UInt64) {
        for chunk in 1..<64 {
            let word = try readWord(path, at: ownerWordOffset(chunk))
            if word != 0 { return (chunk, word) }
        }
        throw TestFailure("no chunk of \(path) is owned")
    }

    static func environment(pool: String) -> [String: String] {
        TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path, "MC_CXL_DEV_PATH": pool, "MC_STRICT_PROTOCOL": "1"])
    }

    static func engine(pool: String, logger: Logger? = nil) throws -> TransferEngine {
        if let logger {
            return try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl"), environment: environment(pool: pool), logger: logger)
        }
        return try TransferEngine(configuration: EngineConfiguration(protocolName: "cxl"), environment: environment(pool: pool))
    }

    @Test("a peer holding the descriptor is refused once the buffer is unregistered; re-registering exposes it again; a copy counted by a dead peer is waited for 2 s")
    func revocation() throws {
        let pool = try Self.makePool(64 << 20)
        defer { unlink(pool) }
        let (logger, capture) = TestSupport.capturingLogger()
        let target = try Self.engine(pool: pool, logger: logger), initiator = try Self.engine(pool: pool)
        defer { initiator.shutdown(); target.shutdown() }
        let buffer = try target.allocateManagedBuffer(length: 4 << 20)
        let source = try initiator.allocateManagedBuffer(length: 1 << 20)
        memset(UnsafeMutableRawPointer(bitPattern: UInt(source))!, 0xAB, 1 << 20)
        let memory = UnsafeMutableRawPointer(bitPattern: UInt(buffer))!.assumingMemoryBound(to: UInt8.self)
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: source, segment: handle, remoteAddress: buffer + 4096, length: 1 << 20)
        #expect(memory[4096] == 0xAB && memory[4096 + (1 << 20) - 1] == 0xAB)

        try target.unregisterMemory(address: buffer)
        memset(memory, 0, 4 << 20)
        #expect(throws: EngineError.self) {
            try initiator.transferSync(.write, localAddress: source, segment: handle, remoteAddress: buffer + 4096, length: 1 << 20)
        }
        #expect(memory[4096] == 0 && memory[4096 + (1 << 20) - 1] == 0, "a peer wrote into unregistered memory")

        try target.registerMemory(address: buffer, length: 4 << 20)
        try initiator.transferSync(.write, localAddress: source, segment: handle, remoteAddress: buffer, length: 4096)
        #expect(memory[0] == 0xAB)

        // A peer that died mid-copy leaves its copy counted in the chunk's access word.
        let offset = try #require(target.localDescriptor.buffers.first { $0.address == buffer }?.extra["cxl_offset"]?.uint64Value)
        let access = Self.ownerWordOffset(Int(offset) / Self.chunkSize) + 8
        try Self.writeWord(pool, at: access, try Self.readWord(pool, at: access) + 1)
        let started = Date()
        try target.unregisterMemory(address: buffer)
        let waited = Date().timeIntervalSince(started)
        #expect(waited >= 1.9 && waited < 4, "unregister took \(waited) s")
        #expect(capture.messages(at: .warning).contains { $0.contains("still counted") }, "\(capture.messages(at: .warning))")
        #expect(try Self.readWord(pool, at: access) == 0)
    }

    @Test("a descriptor whose buffer covers the pool's table (offset 0) gets no byte into it")
    func tableUnreachable() throws {
        let pool = try Self.makePool(32 << 20)
        defer { unlink(pool) }
        let owner = try Self.engine(pool: pool), initiator = try Self.engine(pool: pool)
        defer { initiator.shutdown(); owner.shutdown() }
        let published = owner.localDescriptor.extra
        let poolID = try #require(published["cxl_pool"]?.stringValue), base = try #require(published["cxl_base"]?.uint64Value)
        let ownerWord = published["cxl_owner"]?.uint64Value ?? 1 << 63
        let magic = try Self.readWord(pool, at: 0)
        let source = try initiator.allocateManagedBuffer(length: 1 << 20)
        memset(UnsafeMutableRawPointer(bitPattern: UInt(source))!, 0xEE, 1 << 20)
        let descriptor = #"{"name":"fake","protocol":"cxl","tcp_data_port":1,"cxl_pool":"\#(poolID)","cxl_base":\#(base),"cxl_owner":\#(ownerWord),"buffers":[{"name":"cpu:0","addr":\#(base),"length":\#(4 << 20),"cxl_offset":0}]}"#
        let fake = try SHMHostileDescriptorTests.FakePeer(descriptor: { descriptor }, proofAddress: 0)
        let handle = try initiator.openSegment("127.0.0.1:\(fake.port)")
        for (remote, length) in [(base, UInt64(64)), (base + 8 * 1032, UInt64(4096)), (base + (2 << 20) - 64, UInt64(128))] {
            #expect(throws: EngineError.self) {
                try initiator.transferSync(.write, localAddress: source, segment: handle, remoteAddress: remote, length: length)
            }
        }
        #expect(try Self.readWord(pool, at: 0) == magic)
        #expect(try Self.readWord(pool, at: Self.ownerWordOffset(0)) != 0xEEEE_EEEE_EEEE_EEEE)
        let buffer = try owner.allocateManagedBuffer(length: 1 << 20)  // the table still allocates
        try owner.freeManagedBuffer(address: buffer)
    }

    @Test("a setup cut short (the first layout's 'initialising' word left behind) is redone instead of waited for")
    func setupCutShort() throws {
        let pool = try Self.makePool(32 << 20, firstWord: 0x2D2D_2D2D_2D2D_2D2D)
        defer { unlink(pool) }
        let ready = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var made: TransferEngine?
        Thread.detachNewThread {
            made = try? Self.engine(pool: pool)
            ready.signal()
        }
        #expect(ready.wait(timeout: .now() + 20) == .success, "the engine waited for a setup nobody runs")
        let engine = try #require(made)
        defer { engine.shutdown() }
        #expect(engine.activeProtocol == "cxl")
        #expect(try Self.readWord(pool, at: 0) == 0x3250_4C58_4345_5445)
    }

    @Test("a header that does not match while an engine uses the pool is left alone; a file that is not a pool is not overwritten")
    func mismatchedHeader() throws {
        let pool = try Self.makePool(64 << 20)
        defer { unlink(pool) }
        let holder = try ServeProcess(bufferSize: "8MiB", environment: Self.environment(pool: pool), protocolName: "cxl")
        let (heldChunk, held) = try Self.firstOwnedChunk(pool)
        try Self.writeWord(pool, at: 0, 0x1234_5678)
        let (logger, capture) = TestSupport.capturingLogger()
        #expect(throws: EngineError.self) { _ = try Self.engine(pool: pool, logger: logger) }
        let errors = capture.messages(at: .error)
        #expect(errors.contains { $0.contains("while other engines use the pool; not clearing it") }, "\(errors)")
        #expect(try Self.readWord(pool, at: Self.ownerWordOffset(heldChunk)) == held, "the live engine's chunk was cleared")
        holder.kill()

        // Nobody uses the pool now; still, a file whose first word is no table is not overwritten.
        let (secondLogger, second) = TestSupport.capturingLogger()
        #expect(throws: EngineError.self) { _ = try Self.engine(pool: pool, logger: secondLogger) }
        #expect(second.messages(at: .error).contains { $0.contains("does not start with a pool table") }, "\(second.messages(at: .error))")
        #expect(try Self.readWord(pool, at: 0) == 0x1234_5678)
    }

    @Test("an engine in another pid namespace (its pid unknown out here) keeps its chunks when others run short")
    func otherPidNamespace() throws {
        // A pid that exists in the namespace of the serve process but not in ours: kill(pid, 0)
        // out here would call its owner dead.
        let pidMax = Int32(try String(contentsOfFile: "/proc/sys/kernel/pid_max", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 32768
        let lastPid = try #require((1000..<(pidMax - 2)).reversed().first { Foundation.kill($0 + 1, 0) != 0 && errno == ESRCH })
        let (status, _, _) = try TestSupport.run("/usr/bin/unshare", ["--pid", "--fork", "/bin/true"], timeout: 10)
        try #require(status == 0, "unshare --pid does not work here")
        let pool = try Self.makePool(80 << 20)
        defer { unlink(pool) }
        let launcher = ["/usr/bin/unshare", "--pid", "--fork", "--kill-child", "/bin/sh", "-c",
                        "echo \(lastPid) > /proc/sys/kernel/ns_last_pid || exit 1; exec 3<&0; \"$@\" <&3 & wait $!", "sh"]
        let holder = try ServeProcess(bufferSize: "60MiB", environment: Self.environment(pool: pool), protocolName: "cxl", launcher: launcher)
        let (heldChunk, held) = try Self.firstOwnedChunk(pool)
        let engine = try Self.engine(pool: pool)
        defer { engine.shutdown() }
        #expect(throws: EngineError.self) { _ = try engine.allocateManagedBuffer(length: 40 << 20) }
        #expect(try Self.readWord(pool, at: Self.ownerWordOffset(heldChunk)) == held, "the live engine's chunk was taken")
        let small = try engine.allocateManagedBuffer(length: 8 << 20)
        try engine.freeManagedBuffer(address: small)
        holder.kill()
    }
}
