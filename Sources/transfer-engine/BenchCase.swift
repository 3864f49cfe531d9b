import TransferEngine

/// One benchmark case as `bench` and `bench-metrics` run it: one synchronous transfer when the
/// batch is one request, else the whole batch submitted at once and waited for.
struct BenchCase {
    let engine: TransferEngine
    let op: TransferRequest.Operation
    let block: UInt64
    let local: UInt64
    let handle: SegmentHandle
    let remote: UInt64
    /// The batch's requests: consecutive blocks, their offsets wrapping at `wrap` bytes if given.
    let requests: [TransferRequest]

    init(engine: TransferEngine, op: TransferRequest.Operation, block: UInt64, batch: Int, local: UInt64, handle: SegmentHandle,
         remote: UInt64, wrap: UInt64? = nil) {
        self.engine = engine
        self.op = op
        self.block = block
        self.local = local
        self.handle = handle
        self.remote = remote
        requests = (0..<batch).map { i in
            let offset = wrap.map { (UInt64(i) * block) % ($0 - $0 % block) } ?? UInt64(i) * block
            return TransferRequest(operation: op, localAddress: local + offset, segment: handle, remoteAddress: remote + offset, length: block)
        }
    }

    /// Runs the case once.
    func once() throws {
        if requests.count == 1 {
            try engine.transferSync(op, localAddress: local, segment: handle, remoteAddress: remote, length: block)
        } else {
            try engine.transferBatchSync(requests)
        }
    }
}
