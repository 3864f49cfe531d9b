/// The same-host copy ceilings of `bench --memcpy-reference`: memory copies on the very buffers a
/// transport copies, with as many threads.
///
/// A ceiling is the best figure seen, so every sample raises it: once before the cases and right
/// before and after each case (this machine's memory speed drifts by tens of percent over
/// seconds, an emulated device's more).
public struct CopyCeilings: Sendable {
    /// Where the copies go.
    public enum Memory: Sendable {
        /// Between the halves of a buffer of `size` bytes at `base` (address): the transport copies
        /// between two buffers of one kind (shm's managed buffers), so one figure serves both
        /// directions. Glibc memcpy and cache-bypassing stores, the better counts (a transport may
        /// use either for large blocks).
        case halves(base: UInt64, size: UInt64)
        /// Between this side's buffer at `local` and a buffer of `size` bytes at `peer` of the kind
        /// the target's is (a CXL pool's managed buffer beside a heap buffer): a write copies into
        /// the peer, a read out of it, both at offset 0, where a one-request case copies every time.
        /// Glibc memcpy only, as the cxl plugin copies.
        case peer(local: UInt64, peer: UInt64, size: UInt64)
    }

    /// What the copies go between; nil: nothing the CPU can copy (device memory), so a ceiling
    /// is the one-thread fresh-buffer figure where `threads` is 1, else none.
    public let memory: Memory?
    /// Copy threads, as many as the measured transport copies with.
    public let threads: Int
    /// One thread copying between fresh buffers, GB/s per block (reported beside the ceiling).
    public private(set) var oneThread: [UInt64: Double] = [:]
    /// The best GB/s seen per direction and block.
    public private(set) var best: [TransferRequest.Operation: [UInt64: Double]] = [:]

    /// Ceilings on `memory` with `threads` copy threads; nothing is measured yet.
    public init(memory: Memory?, threads: Int) {
        self.memory = memory
        self.threads = max(1, threads)
    }

    /// The ceiling for `op` of `block`-byte requests so far, GB/s.
    public func ceiling(_ op: TransferRequest.Operation, _ block: UInt64) -> Double? { best[op]?[block] }

    /// Measures the fresh-buffer figure and a first ceiling of each direction for every block,
    /// each for about `seconds`.
    public mutating func start(blocks: [UInt64], seconds: Double = 0.2) {
        for block in blocks {
            oneThread[block] = StreamReference.memcpy(block: Int(block), seconds: seconds) / 1e9
            sample(.write, block, seconds: seconds)
            if case .peer = memory { sample(.read, block, seconds: seconds) }
        }
    }

    /// Copies `block` bytes the way `op` moves them for about `seconds` (at least once) and keeps
    /// the figure if it is the best so far.
    public mutating func sample(_ op: TransferRequest.Operation, _ block: UInt64, seconds: Double) {
        let copy: (source: UInt64, target: UInt64, kinds: [Bool], ops: [TransferRequest.Operation])
        switch memory {
        case .halves(let base, let size) where block <= size / 2:
            copy = (base, base + size / 2, [false, true], [.write, .read])
        case .peer(let local, let peer, let size) where block <= size:
            copy = op == .write ? (local, peer, [false], [.write]) : (peer, local, [false], [.read])
        default:
            // Nothing to copy on: with one thread the fresh-buffer figure is that thread's ceiling.
            if threads == 1, let one = oneThread[block] { keep(one, for: [.write, .read], block) }
            return
        }
        guard let source = UnsafeRawPointer(bitPattern: UInt(copy.source)), let target = UnsafeMutableRawPointer(bitPattern: UInt(copy.target)) else { return }
        let measured = copy.kinds.compactMap {
            StreamReference.memcpy(block: Int(block), threads: threads, source: source, target: target, seconds: seconds, bypassingCache: $0)
        }.max()
        if let measured { keep(measured / 1e9, for: copy.ops, block) }
    }

    private mutating func keep(_ gbps: Double, for ops: [TransferRequest.Operation], _ block: UInt64) {
        for op in ops where gbps > best[op]?[block] ?? 0 { best[op, default: [:]][block] = gbps }
    }

    /// What the copies go between, in words (the bench's JSON document carries it).
    public var copiesBetween: String {
        switch memory {
        case .halves: return "halves of this side's buffer"
        case .peer: return "this side's buffer and a managed buffer of this engine (writes into it, reads out of it)"
        case nil: return "fresh buffers (this side's buffer is not host memory)"
        }
    }

    /// The ceilings by operation name, then by block size (as decimal text), GB/s.
    public var dictionary: [String: [String: Double]] {
        Dictionary(uniqueKeysWithValues: best.map { op, blocks in
            (op.description, Dictionary(uniqueKeysWithValues: blocks.map { (String($0.key), $0.value) }))
        })
    }
}
