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
        let end = start + UInt64(seconds * 1e9)
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

    /// Single-threaded memcpy bandwidth for `block`-byte copies, bytes per second.
    public static func memcpy(block: Int, seconds: Double = 0.3) -> Double {
        let source = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: 4096)
        let target = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: 4096)
        defer { source.deallocate(); target.deallocate() }
        memset(source, 1, block)
        memset(target, 2, block)
        // Otherwise the optimiser knows the source is all ones and turns the copy into a memset.
        te_consume(source)
        let start = MonotonicClock.nanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var bytes: UInt64 = 0
        var iterations = 0
        while MonotonicClock.nanoseconds() < end, iterations < 10_000_000 {
            Glibc.memcpy(target, source, block)
            // An opaque use of the target keeps each copy (nothing else reads it).
            te_consume(target)
            bytes += UInt64(block)
            iterations += 1
        }
        return Double(bytes) / (Double(MonotonicClock.nanoseconds() - start) / 1e9)
    }
}
