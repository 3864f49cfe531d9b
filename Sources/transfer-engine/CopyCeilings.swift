import TransferEngine

/// The same-host copy ceilings of `bench --memcpy-reference`: memcpy (or cache-bypassing stores,
/// the better) on the very buffers the measured transport copies, with as many threads.
///
/// A ceiling is the best figure seen, so every measurement raises it: once before the cases and
/// right before and after each case (this machine's memory speed drifts by tens of percent over
/// seconds, an emulated device's more).
struct CopyCeilings {
    /// Where the copies go.
    enum Memory {
        /// Between the halves of this side's buffer (the transport copies between two buffers of
        /// one kind, as shm's managed buffers): one figure serves both directions.
        case halves(base: UnsafeMutableRawPointer, size: UInt64)
        /// Between this side's buffer and a buffer of the kind the target's is (a CXL pool's
        /// managed buffer beside a heap buffer): a write copies into the peer, a read out of it.
        /// Both copies start at offset 0, where a one-request case copies every time.
        case peer(local: UnsafeMutableRawPointer, peer: UnsafeMutableRawPointer, size: UInt64)
    }

    /// nil: no buffer the CPU can copy (device memory); ceilings fall back to `oneThread`.
    let memory: Memory?
    let threads: Int
    /// Best bytes/s over fresh buffers, one thread, per block (reported beside the ceiling).
    private(set) var oneThread: [UInt64: Double] = [:]
    /// Best GB/s per direction and block.
    private(set) var best: [TransferRequest.Operation: [UInt64: Double]] = [:]

    init(memory: Memory?, threads: Int) {
        self.memory = memory
        self.threads = threads
    }

    /// The ceiling for `op` of `block`-byte requests so far, GB/s.
    func ceiling(_ op: TransferRequest.Operation, _ block: UInt64) -> Double? { best[op]?[block] }

    /// Measures the fresh-buffer figure and a first ceiling of each direction.
    mutating func start(blocks: [UInt64]) {
        for block in blocks {
            oneThread[block] = StreamReference.memcpy(block: Int(block), seconds: 0.2) / 1e9
            raise(.write, block, seconds: 0.2)
            if case .peer = memory { raise(.read, block, seconds: 0.2) }
        }
    }

    /// Measures `op`'s ceiling for `block` for about `seconds` (at least one copy) and keeps the better.
    mutating func raise(_ op: TransferRequest.Operation, _ block: UInt64, seconds: Double) {
        let copy: (source: UnsafeRawPointer, target: UnsafeMutableRawPointer, ops: [TransferRequest.Operation])
        switch memory {
        case .halves(let base, let size) where block <= size / 2:
            copy = (UnsafeRawPointer(base), base + Int(size / 2), [.write, .read])
        case .peer(let local, let peer, let size) where block <= size:
            copy = op == .write ? (UnsafeRawPointer(local), peer, [.write]) : (UnsafeRawPointer(peer), local, [.read])
        default:
            // Nothing to copy on: with one thread the fresh-buffer figure is that thread's ceiling.
            if threads == 1, let one = oneThread[block] { keep(one, for: [.write, .read], block) }
            return
        }
        let measured = [false, true].compactMap {
            StreamReference.memcpy(block: Int(block), threads: threads, source: copy.source, target: copy.target, seconds: seconds, bypassingCache: $0)
        }.max()
        if let measured { keep(measured / 1e9, for: copy.ops, block) }
    }

    private mutating func keep(_ gbps: Double, for ops: [TransferRequest.Operation], _ block: UInt64) {
        for op in ops where gbps > best[op]?[block] ?? 0 { best[op, default: [:]][block] = gbps }
    }

    /// What the ceilings copy between, for the JSON document.
    var description: String {
        switch memory {
        case .halves: return "halves of this side's buffer"
        case .peer: return "this side's buffer and a managed buffer of this engine (writes into it, reads out of it)"
        case nil: return "fresh buffers (this side's buffer is not host memory)"
        }
    }

    /// The ceilings as JSON: by operation, then by block size.
    var dictionary: [String: [String: Double]] {
        Dictionary(uniqueKeysWithValues: best.map { op, blocks in
            (op == .read ? "read" : "write", Dictionary(uniqueKeysWithValues: blocks.map { (String($0.key), $0.value) }))
        })
    }
}
