/// Batches: allocation, status and waiting. Submission is in `EngineTransfers`.
extension TransferEngine {
    /// Allocates a batch that can hold `capacity` tasks.
    public func allocateBatch(capacity: Int) throws -> BatchID {
        guard capacity > 0, capacity <= 1 << 20 else { throw EngineError.invalidArgument("batch capacity \(capacity) (1...1048576)") }
        return state.withLock { state in
            let id = state.nextBatch
            state.nextBatch += 1
            state.batches[id] = Batch(id: id, capacity: capacity)
            return id
        }
    }

    /// Frees a batch; refuses while tasks are in flight (as upstream).
    public func freeBatch(_ id: BatchID) throws {
        guard let batch = state.withLock({ $0.batches[id] }) else { throw EngineError.invalidBatch(id) }
        if batch.hasUnfinishedTasks { throw EngineError.batchBusy("batch \(id) still has tasks in flight") }
        state.withLock { _ = $0.batches.removeValue(forKey: id) }
    }

    func batch(_ id: BatchID) throws -> Batch {
        guard let batch = state.withLock({ $0.batches[id] }) else { throw EngineError.invalidBatch(id) }
        return batch
    }

    /// Status of one task of a batch (`timeout` once its deadline passed).
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
