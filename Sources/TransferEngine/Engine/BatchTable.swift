/// Batches: allocation, status and waiting. Submission is in `EngineTransfers`.
extension TransferEngine {
    /// Allocates a batch that can hold `capacity` tasks. `timeoutNs` is the deadline of each of
    /// its requests from submission (nil: MC_TRANSFER_TIMEOUT plus 1 ns per byte); a request
    /// still pending then reads `timeout` (once the transports gave it back, see `Batch`).
    public func allocateBatch(capacity: Int, timeoutNs: UInt64? = nil) throws -> BatchID {
        guard capacity > 0, capacity <= 1 << 20 else { throw EngineError.invalidArgument("batch capacity \(capacity) (1...1048576)") }
        if let timeoutNs, timeoutNs == 0 || timeoutNs > 86_400_000_000_000 {
            throw EngineError.invalidArgument("batch timeout \(timeoutNs) ns (1 ns ... 24 h)")
        }
        return state.withLock { state in
            let id = state.nextBatch
            state.nextBatch += 1
            state.batches[id] = Batch(id: id, capacity: capacity, timeoutNs: timeoutNs, graceNs: UInt64(settings.freeBatchWaitMs) * 1_000_000)
            return id
        }
    }

    /// Frees a batch. Requests still in flight are canceled: they read `canceled`, slices not yet
    /// started are dropped, and this waits (up to MC_FREE_BATCH_WAIT_MS) until no transport holds
    /// a slice of the batch, so nothing lands in memory the caller was told is done. When a
    /// transport still holds some then, the batch is kept and `batchBusy` says so (free it again later).
    public func freeBatch(_ id: BatchID) throws {
        guard let batch = state.withLock({ $0.batches[id] }) else { throw EngineError.invalidBatch(id) }
        if batch.outstandingSlices > 0 {
            let canceled = batch.cancel()
            if canceled > 0 { logger.info("batch \(id) freed with \(canceled) requests in flight: canceled") }
            let deadline = MonotonicClock.nanoseconds() + UInt64(settings.freeBatchWaitMs) * 1_000_000
            guard batch.waitQuiet(deadline: deadline) else {
                throw EngineError.batchBusy("batch \(id): its requests are canceled, but \(batch.outstandingSlices) slices are still inside transports "
                                            + "after \(settings.freeBatchWaitMs) ms; free it again later")
            }
        }
        state.withLock { _ = $0.batches.removeValue(forKey: id) }
    }

    func batch(_ id: BatchID) throws -> Batch {
        guard let batch = state.withLock({ $0.batches[id] }) else { throw EngineError.invalidBatch(id) }
        return batch
    }

    /// Status of one task of a batch (`timeout` once its deadline passed and its transport gave
    /// it back, or MC_FREE_BATCH_WAIT_MS after the deadline at the latest).
    public func status(batch id: BatchID, task: Int) throws -> TransferStatus {
        guard let status = try batch(id).status(task: task) else {
            throw EngineError.invalidArgument("batch \(id) has no task \(task)")
        }
        return status
    }

    /// Statuses of every task of a batch.
    public func statuses(batch id: BatchID) throws -> [TransferStatus] { try batch(id).statuses }

    /// Waits until every task of the batch finished or `timeoutNs` passed; true when all finished.
    public func wait(batch id: BatchID, timeoutNs: UInt64) throws -> Bool {
        try batch(id).waitAll(deadline: MonotonicClock.nanoseconds() + timeoutNs)
    }

    /// Mooncake's sync timeout: MC_TRANSFER_TIMEOUT (30 s) plus 1 ns per byte; also each
    /// batched request's deadline.
    func syncTimeout(bytes: UInt64) -> UInt64 { settings.transferTimeoutNs + bytes }
}
