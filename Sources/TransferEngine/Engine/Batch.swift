/// The tasks of one batch and their completion state.
///
/// Transports report finished slices through `sliceFinished`; a task with
/// several slices completes when the last one does, and fails if any did. A task
/// still pending at its deadline ends as `timeout`; slices that end later are ignored.
final class Batch: @unchecked Sendable {
    private struct Task {
        var status = TransferStatus(state: .waiting)
        var pendingSlices = 0
        /// Monotonic ns after which the task is reported as timed out (0: none).
        var deadline: UInt64 = 0
    }

    private struct State {
        var tasks: [Task] = []
        var unfinished = 0
        /// The earliest deadline of an unfinished task (UInt64.max: none), so expiry costs one compare.
        var earliestDeadline = UInt64.max
    }

    let id: BatchID
    let capacity: Int
    private let state = ConditionLock(State())

    init(id: BatchID, capacity: Int) {
        self.id = id
        self.capacity = capacity
    }

    /// Reserves `sliceCounts.count` new tasks that must end by `deadline` (monotonic ns, 0: never);
    /// returns the index of the first.
    func addTasks(sliceCounts: [Int], deadline: UInt64 = 0) throws -> Int {
        try state.withLock { state in
            guard state.tasks.count + sliceCounts.count <= capacity else {
                throw EngineError.batchBusy("batch \(id) holds \(state.tasks.count) of \(capacity) tasks; cannot add \(sliceCounts.count)")
            }
            let first = state.tasks.count
            for slices in sliceCounts {
                var task = Task()
                task.status.state = slices == 0 ? .completed : .pending
                task.pendingSlices = slices
                if slices > 0 {
                    state.unfinished += 1
                    if deadline != 0 {
                        task.deadline = deadline
                        state.earliestDeadline = min(state.earliestDeadline, deadline)
                    }
                }
                state.tasks.append(task)
            }
            return first
        }
    }

    /// Announces `count` more slices of a pending task (a failed slice resubmitted in pieces).
    func addSlices(task index: Int, count: Int) {
        guard count > 0 else { return }
        state.withLock { state in
            guard index < state.tasks.count, state.tasks[index].pendingSlices > 0 else { return }
            state.tasks[index].pendingSlices += count
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

    /// Ends every unfinished task whose deadline passed as `timeout`; true when that finished the batch.
    private static func expire(_ state: inout State, now: UInt64) -> Bool {
        guard now >= state.earliestDeadline else { return false }
        var earliest = UInt64.max
        for index in state.tasks.indices where state.tasks[index].pendingSlices > 0 {
            let deadline = state.tasks[index].deadline
            if deadline == 0 { continue }
            if deadline > now { earliest = min(earliest, deadline); continue }
            state.tasks[index].pendingSlices = 0
            state.tasks[index].status.state = .timeout
            state.tasks[index].status.error = "did not finish within its deadline"
            state.unfinished -= 1
        }
        state.earliestDeadline = earliest
        return state.unfinished == 0
    }

    /// The number of tasks submitted so far.
    var taskCount: Int { state.withLock { $0.tasks.count } }

    /// Status of task `index`, or nil if there is no such task.
    func status(task index: Int) -> TransferStatus? {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            _ = Self.expire(&state, now: now)
            return index >= 0 && index < state.tasks.count ? state.tasks[index].status : nil
        }
    }

    /// Statuses of all tasks.
    var statuses: [TransferStatus] {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            _ = Self.expire(&state, now: now)
            return state.tasks.map(\.status)
        }
    }

    /// Whether any task is still in flight.
    var hasUnfinishedTasks: Bool {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            _ = Self.expire(&state, now: now)
            return state.unfinished > 0
        }
    }

    /// Blocks until every task finished (or timed out) or the monotonic deadline passes; true when all finished.
    func waitAll(deadline: UInt64?) -> Bool {
        while true {
            let now = MonotonicClock.nanoseconds()
            let (done, wakeAt) = state.withLock { state -> (Bool, UInt64) in
                (Self.expire(&state, now: now) || state.unfinished == 0, state.earliestDeadline)
            }
            if done { return true }
            if let deadline, now >= deadline { return false }
            let until = min(deadline ?? UInt64.max, wakeAt)
            if state.wait(deadline: until == UInt64.max ? nil : until, until: { $0.unfinished == 0 ? true : nil }) == true { return true }
        }
    }
}
