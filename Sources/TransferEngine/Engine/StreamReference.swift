import CTransferEngineShims
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A reference measurement for benchmarks: one plain TCP stream over
/// loopback between two threads (what iperf3's single-stream test does),
/// receiving into and sending from page-aligned buffers.
public enum StreamReference {
    /// Returns bytes per second moved over one loopback TCP connection in about `seconds`.
    public static func loopbackTCP(host: String = "127.0.0.1", chunk: Int = 4 << 20, seconds: Double = 1.0) throws -> Double {
        guard seconds.isFinite, seconds > 0, chunk > 0 else { throw EngineError.invalidArgument("loopbackTCP: seconds and chunk must be positive") }
        let listener = try Socket.listen(host: host, port: 0)
        let port = listener.localAddress.port
        let done = ConditionLock<(bytes: UInt64, finished: Bool)>((0, false))
        try OSThread.spawn(name: "te-ref-recv") {
            defer { done.withLock(notify: true) { $0.finished = true } }
            guard let connection = try? listener.accept() else { return }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            var total: UInt64 = 0
            while let n = try? connection.receiveSome(buffer, count: chunk), n > 0 { total += UInt64(n) }
            done.withLock { $0.bytes = total }
        }
        let sender = try Socket.connect(host: host, port: port, timeoutMs: 2000)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0x5A, chunk)
        let start = MonotonicClock.nanoseconds()
        let end = start + UInt64(min(seconds, 3600) * 1e9)
        var iterations = 0
        while MonotonicClock.nanoseconds() < end, iterations < 1_000_000 {
            try sender.sendAll(buffer, count: chunk)
            iterations += 1
        }
        sender.shutdownWrite()
        _ = done.wait(deadline: MonotonicClock.nanoseconds() + 10_000_000_000) { $0.finished ? true : nil }
        let elapsed = Double(MonotonicClock.nanoseconds() - start) / 1e9
        sender.close()
        listener.close()
        return Double(done.withLock { $0.bytes }) / elapsed
    }

    /// memcpy bandwidth for `block`-byte copies from `source` to `target` (each at least `block`
    /// bytes: a caller passes the buffers the measured transport copies, warmed the same way),
    /// repeated for about `seconds` (at least once) by `threads` threads (one: the calling thread)
    /// that each copy a contiguous share, as a transport with that many copy threads splits a
    /// request: the threads' combined throughput (no barrier per block), bytes per second; a
    /// block under 64 bytes per thread runs on fewer threads. Nil for a non-positive block or time, or when a thread could not
    /// be started.
    /// With `bypassingCache` the copies use non-temporal stores (te_copy_bypassing_cache), the way
    /// a transport may copy large blocks; the ceiling for such a transport is the better of the two.
    public static func memcpy(block: Int, threads: Int, source: UnsafeRawPointer, target: UnsafeMutableRawPointer, seconds: Double,
                              bypassingCache: Bool = false) -> Double? {
        guard block > 0, seconds.isFinite, seconds > 0 else { return nil }
        let count = max(1, min(threads, 64))
        // Shares of whole cache lines, the last one taking the rest.
        let share = max(64, (block / count + 63) & ~63)
        let pieces = stride(from: 0, to: block, by: share).map { ($0, min(share, block - $0)) }
        let end = MonotonicClock.nanoseconds() + UInt64(min(seconds, 3600) * 1e9)
        let finished = ConditionLock<(bytes: UInt64, left: Int)>((0, pieces.count))
        let start = MonotonicClock.nanoseconds()
        let (sourceBits, targetBits) = (UInt(bitPattern: source), UInt(bitPattern: target))
        for (index, (offset, length)) in pieces.enumerated() {
            let copy: @Sendable () -> Void = {
                let from = UnsafeRawPointer(bitPattern: sourceBits)! + offset, to = UnsafeMutableRawPointer(bitPattern: targetBits)! + offset
                var bytes: UInt64 = 0
                var iterations = 0
                // At least one copy, however short the time (one block may take longer on slow memory).
                repeat {
                    if bypassingCache { te_copy_bypassing_cache(to, from, length) } else { Glibc.memcpy(to, from, length) }
                    te_consume(to)
                    bytes += UInt64(length)
                    iterations += 1
                } while MonotonicClock.nanoseconds() < end && iterations < 10_000_000
                finished.withLock(notify: true) { $0.bytes += bytes; $0.left -= 1 }
            }
            // One piece copies on the calling thread, as a transport that copies on its caller's
            // thread does (the cxl plugin); on an emulated device a spawned thread may run on a
            // slower virtual CPU than the caller.
            if pieces.count == 1 { copy(); break }
            do { try OSThread.spawn(name: "te-ref-memcpy", copy) } catch {
                // This piece and the ones not started yet will not report.
                finished.withLock(notify: true) { $0.left -= pieces.count - index }
                _ = finished.wait { $0.left == 0 ? true : nil }
                return nil
            }
        }
        let bytes = finished.wait { $0.left == 0 ? $0.bytes : nil } ?? 0
        return Double(bytes) / (Double(MonotonicClock.nanoseconds() - start) / 1e9)
    }

    /// Single-threaded memcpy bandwidth for `block`-byte copies between two fresh buffers, bytes per second.
    public static func memcpy(block: Int, seconds: Double = 0.3) -> Double {
        let source = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: 4096)
        let target = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: 4096)
        defer { source.deallocate(); target.deallocate() }
        memset(source, 1, block)
        memset(target, 2, block)
        // Otherwise the optimiser knows the source is all ones and turns the copy into a memset.
        te_consume(source)
        return memcpy(block: block, threads: 1, source: source, target: target, seconds: seconds) ?? 0
    }
}
