/// The tasks of one batch and their completion state.
///
/// Transports report finished slices through `sliceFinished`; a task with
/// several slices completes when the last one does, and fails if any did.
final class Batch: @unchecked Sendable {
    private struct Task {
        var status = TransferStatus(state: .waiting)
        var pendingSlices = 0
    }

    private struct State {
        var tasks: [Task] = []
        var unfinished = 0
    }

    let id: BatchID
    let capacity: Int
    private let state = ConditionLock(State())

    init(id: BatchID, capacity: Int) {
        self.id = id
        self.capacity = capacity
    }

    /// Reserves `sliceCounts.count` new tasks; returns the index of the first.
    func addTasks(sliceCounts: [Int]) throws -> Int {
        try state.withLock { state in
            guard state.tasks.count + sliceCounts.count <= capacity else {
                throw EngineError.batchBusy("batch \(id) holds \(state.tasks.count) of \(capacity) tasks; cannot add \(sliceCounts.count)")
            }
            let first = state.tasks.count
            for slices in sliceCounts {
                var task = Task()
                task.status.state = slices == 0 ? .completed : .pending
                task.pendingSlices = slices
                state.tasks.append(task)
                if slices > 0 { state.unfinished += 1 }
            }
            return first
        }
    }

    /// Records one finished slice of task `index` (no array built: a synchronous transfer
    /// finishes one slice per call).
    func sliceFinished(task index: Int, bytes: UInt64, error: String?) {
        let wake = state.withLock { state in Self.record(&state, task: index, bytes: bytes, error: error) }
        if wake { state.notifyAll() }
    }

    /// Records several finished slices under one lock acquisition. Waiters are
    /// woken only when the last unfinished task completes (status polls need no wake-up).
    func slicesFinished(_ slices: [(task: Int, bytes: UInt64, error: String?)]) {
        let wake = state.withLock { state in
            var wake = false
            for (index, bytes, error) in slices where Self.record(&state, task: index, bytes: bytes, error: error) { wake = true }
            return wake
        }
        if wake { state.notifyAll() }
    }

    /// One finished slice; true when it finished the batch's last unfinished task.
    private static func record(_ state: inout State, task index: Int, bytes: UInt64, error: String?) -> Bool {
        guard index < state.tasks.count, state.tasks[index].pendingSlices > 0 else { return false }
        state.tasks[index].pendingSlices -= 1
        if let error {
            state.tasks[index].status.state = .failed
            if state.tasks[index].status.error == nil { state.tasks[index].status.error = error }
        } else {
            state.tasks[index].status.transferredBytes += bytes
        }
        guard state.tasks[index].pendingSlices == 0 else { return false }
        if state.tasks[index].status.state != .failed { state.tasks[index].status.state = .completed }
        state.unfinished -= 1
        return state.unfinished == 0
    }

    /// The number of tasks submitted so far.
    var taskCount: Int { state.withLock { $0.tasks.count } }

    /// Status of task `index`, or nil if there is no such task.
    func status(task index: Int) -> TransferStatus? {
        state.withLock { state in index >= 0 && index < state.tasks.count ? state.tasks[index].status : nil }
    }

    /// Statuses of all tasks.
    var statuses: [TransferStatus] { state.withLock { $0.tasks.map(\.status) } }

    /// Whether any task is still in flight.
    var hasUnfinishedTasks: Bool { state.withLock { $0.unfinished > 0 } }

    /// Blocks until every task finished or the monotonic deadline passes; true when all finished.
    func waitAll(deadline: UInt64?) -> Bool {
        state.wait(deadline: deadline) { $0.unfinished == 0 ? true : nil } ?? false
    }
}
