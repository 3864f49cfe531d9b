import CTransferEngineShims
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Testing
@testable import TransferEngine

/// The memory-copy ceiling's cache-bypassing copy (bench --memcpy-reference): it must copy exactly
/// what memcpy copies, at every length and alignment, or the ceiling measures something else.
@Suite("Copy ceiling")
struct CopyCeilingTests {
    @Test("te_copy_bypassing_cache copies every byte and nothing around it, at odd lengths and offsets")
    func copiesExactly() {
        let capacity = (1 << 20) + 512
        let source = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        let target = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        defer { source.deallocate(); target.deallocate() }
        for i in 0..<capacity { source.storeBytes(of: UInt8(truncatingIfNeeded: i &* 131 &+ 7), toByteOffset: i, as: UInt8.self) }
        for length in [0, 1, 15, 63, 64, 65, 127, 4095, 65_537, 1 << 20] {
            for (from, to) in [(0, 0), (3, 17), (64, 1), (33, 64)] {
                memset(target, 0xEE, capacity)
                te_copy_bypassing_cache(target + to, source + from, length)
                #expect(memcmp(target + to, source + from, length) == 0, "length \(length), offsets \(from)/\(to)")
                let before = (0..<to).allSatisfy { target.load(fromByteOffset: $0, as: UInt8.self) == 0xEE }
                let after = (to + length..<min(capacity, to + length + 64)).allSatisfy { target.load(fromByteOffset: $0, as: UInt8.self) == 0xEE }
                #expect(before && after, "bytes outside the copy changed (length \(length), offsets \(from)/\(to))")
            }
        }
    }

    @Test("the reference measures both copies, with several threads")
    func referenceMeasuresBoth() {
        let block = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 2 * block, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 1, 2 * block)
        for bypassing in [false, true] {
            let rate = StreamReference.memcpy(block: block, threads: 2, source: buffer, target: buffer + block, seconds: 0.05, bypassingCache: bypassing)
            #expect((rate ?? 0) > 0, "bypassingCache \(bypassing): \(String(describing: rate))")
        }
        #expect(StreamReference.memcpy(block: block, threads: 2, source: buffer, target: buffer + block, seconds: 0) == nil)
    }

    @Test("bench's ceilings copy the way each direction moves: a write into the peer buffer, a read out of it; halves serve both")
    func ceilingDirections() {
        let block = 64 << 10
        let local = TestBuffer(block), peer = TestBuffer(block)
        local.fillPattern(seed: 1)
        peer.fillPattern(seed: 2)
        var ceilings = CopyCeilings(memory: .peer(local: local.address, peer: peer.address, size: UInt64(block)), threads: 1)
        ceilings.sample(.write, UInt64(block), seconds: 0.01)
        #expect(local.equals(peer, length: block), "a write sample copies this side's buffer into the peer")
        #expect(ceilings.ceiling(.write, UInt64(block)) ?? 0 > 0 && ceilings.ceiling(.read, UInt64(block)) == nil)
        peer.fillPattern(seed: 3)
        let expected = TestBuffer(block)
        expected.fillPattern(seed: 3)
        ceilings.sample(.read, UInt64(block), seconds: 0.01)
        #expect(local.equals(expected, length: block), "a read sample copies the peer into this side's buffer")
        #expect(ceilings.ceiling(.read, UInt64(block)) ?? 0 > 0)
        // A block larger than the peer buffer is not copied; with one thread the fresh-buffer figure
        // (none measured here) would stand in.
        ceilings.sample(.write, UInt64(2 * block), seconds: 0.01)
        #expect(ceilings.ceiling(.write, UInt64(2 * block)) == nil)

        let halves = TestBuffer(2 * block)
        halves.fillPattern(seed: 4)
        memset(halves.pointer + block, 0, block)
        var shared = CopyCeilings(memory: .halves(base: halves.address, size: UInt64(2 * block)), threads: 2)
        shared.sample(.read, UInt64(block), seconds: 0.01)
        #expect(memcmp(halves.pointer, halves.pointer + block, block) == 0, "halves: the first half is copied onto the second")
        #expect(shared.ceiling(.read, UInt64(block)) == shared.ceiling(.write, UInt64(block)) && shared.ceiling(.write, UInt64(block)) ?? 0 > 0)
        #expect(shared.copiesBetween.contains("halves") && ceilings.copiesBetween.contains("managed buffer"))
    }
}
