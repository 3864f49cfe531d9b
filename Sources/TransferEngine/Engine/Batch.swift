import Synchronization

/// The tasks of one batch and their completion state.
///
/// Transports report finished slices through `sliceFinished`; a task with several slices
/// completes when the last one does, and fails if any did. A task still pending at its
/// deadline ends as `timeout` once the transports gave its slices back (they stop their I/O at
/// the deadline), so nothing lands in a buffer the caller was told is finished; a transport
/// that keeps a slice longer than `graceNs` past the deadline no longer holds the status back
/// (its error says the buffer may still be written). `cancel` ends every pending task as
/// `canceled`; slices of an ended task that end later change nothing, but are still counted,
/// so `waitQuiet` can tell when no transport holds any slice of the batch.
final class Batch: @unchecked Sendable {
    private struct Task {
        var status = TransferStatus(state: .waiting)
        /// Slices a transport still holds (reported or not yet).
        var pendingSlices = 0
        /// Monotonic ns after which the task is reported as timed out (0: none).
        var deadline: UInt64 = 0
        /// Timed out or canceled: its status is final while slices may still be out.
        var ended = false
        /// Where its end is counted (nil: metrics off), and when it started.
        var meter: RequestMeter?
        var startedAt: UInt64 = 0

        /// Counts the task's end once its status is final. Called under the batch's lock, so a
        /// waiter that sees the task end also sees it counted (meters never take this lock).
        func recordEnd() { meter?.ended(status.state, transferred: status.state == .completed ? status.transferredBytes : 0, startedAt: startedAt) }
    }

    private struct State {
        var tasks: [Task] = []
        /// Tasks neither finished nor ended.
        var unfinished = 0
        /// Slices transports still hold, for every task.
        var outstanding = 0
        /// When the earliest unfinished task stops waiting for its transport: its deadline plus the
        /// grace (UInt64.max: none), so expiry costs one compare.
        var earliestDeadline = UInt64.max
    }

    let id: BatchID
    let capacity: Int
    /// The deadline of its requests, from submission (nil: the engine's default).
    let timeoutNs: UInt64?
    private let state = ConditionLock(State())
    /// How long past its deadline a task waits for the transports to give its slices back.
    let graceNs: UInt64
    /// Set by `cancel`; transports check it before they start a slice.
    private let canceled = Atomic<Bool>(false)

    init(id: BatchID, capacity: Int, timeoutNs: UInt64? = nil, graceNs: UInt64 = 5_000_000_000) {
        self.id = id
        self.capacity = capacity
        self.timeoutNs = timeoutNs
        self.graceNs = graceNs
    }

    /// Whether the batch was canceled: queued slices of it need not run.
    var isCanceled: Bool { canceled.load(ordering: .relaxed) }

    /// Reserves `sliceCounts.count` new tasks that must end by `deadline` (monotonic ns, 0: never);
    /// returns the index of the first. `meters` (parallel to `sliceCounts`, or empty) count their ends.
    func addTasks(sliceCounts: [Int], deadline: UInt64 = 0, meters: [RequestMeter?] = []) throws -> Int {
        let startedAt = meters.isEmpty ? 0 : MonotonicClock.nanoseconds()
        return try state.withLock { state in
            guard !isCanceled else { throw EngineError.batchBusy("batch \(id) is being freed; allocate another") }
            guard state.tasks.count + sliceCounts.count <= capacity else {
                throw EngineError.batchBusy("batch \(id) holds \(state.tasks.count) of \(capacity) tasks; cannot add \(sliceCounts.count)")
            }
            let first = state.tasks.count
            for (i, slices) in sliceCounts.enumerated() {
                var task = Task()
                // Zero-length requests are not counted (as synchronous ones are not).
                if slices > 0, i < meters.count, let meter = meters[i] {
                    task.meter = meter
                    task.startedAt = startedAt
                    meter.started(slices: slices)
                }
                task.status.state = slices == 0 ? .completed : .pending
                task.pendingSlices = slices
                if slices > 0 {
                    state.unfinished += 1
                    state.outstanding += slices
                    if deadline != 0 {
                        task.deadline = deadline
                        state.earliestDeadline = min(state.earliestDeadline, graceEnd(deadline))
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
            state.outstanding += count
        }
    }

    /// Counts `count` slices of task `index` handed to a transport again (a failover's resubmit).
    func countResubmitted(task index: Int, slices count: Int) {
        guard let meter = state.withLock({ state in index < state.tasks.count ? state.tasks[index].meter : nil }) else { return }
        meter.resubmitted(slices: count)
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

    /// One finished slice; true when waiters should look again (the last unfinished task
    /// finished, or the last slice of the batch came back).
    private static func record(_ state: inout State, task index: Int, bytes: UInt64, error: String?) -> Bool {
        guard index < state.tasks.count, state.tasks[index].pendingSlices > 0 else { return false }
        state.tasks[index].pendingSlices -= 1
        state.outstanding -= 1
        if state.tasks[index].ended { return state.outstanding == 0 }
        if let error {
            let deadline = state.tasks[index].deadline
            if state.tasks[index].status.state == .pending {
                state.tasks[index].status.state = deadline != 0 && MonotonicClock.nanoseconds() >= deadline ? .timeout : .failed
            }
            if state.tasks[index].status.error == nil { state.tasks[index].status.error = error }
        } else {
            state.tasks[index].status.transferredBytes += bytes
        }
        guard state.tasks[index].pendingSlices == 0 else { return false }
        if state.tasks[index].status.state == .pending { state.tasks[index].status.state = .completed }
        state.tasks[index].recordEnd()
        state.unfinished -= 1
        return state.unfinished == 0 || state.outstanding == 0
    }

    /// When a task past `deadline` stops waiting for its transport.
    private func graceEnd(_ deadline: UInt64) -> UInt64 {
        let (end, overflow) = deadline.addingReportingOverflow(graceNs)
        return overflow ? UInt64.max : end
    }

    /// Ends as `timeout` every unfinished task whose deadline passed more than `graceNs` ago
    /// (the transports still hold part of it); true when that finished the batch. Until then
    /// `earliestDeadline` is when to look again.
    private func expire(_ state: inout State, now: UInt64) -> Bool {
        guard now >= state.earliestDeadline else { return false }
        var earliest = UInt64.max
        for index in state.tasks.indices where state.tasks[index].pendingSlices > 0 && !state.tasks[index].ended {
            let deadline = state.tasks[index].deadline
            if deadline == 0 { continue }
            let endsAt = graceEnd(deadline)
            // Nothing changes at the deadline itself (the transport ends the task): look again at its end.
            if endsAt > now { earliest = min(earliest, endsAt); continue }
            state.tasks[index].ended = true
            state.tasks[index].status.state = .timeout
            state.tasks[index].status.error = "did not finish within its deadline, and a transport still held it \(graceNs / 1_000_000) ms later: "
                + "its buffers may still be read or written until the batch is freed"
            state.tasks[index].recordEnd()
            state.unfinished -= 1
        }
        state.earliestDeadline = earliest
        return state.unfinished == 0
    }

    /// Ends every unfinished task as `canceled`; transports skip its slices they have not started.
    /// Returns how many tasks it ended.
    @discardableResult
    func cancel() -> Int {
        let ended = state.withLock { state -> Int in
            canceled.store(true, ordering: .relaxed)
            var ended = 0
            for index in state.tasks.indices where state.tasks[index].pendingSlices > 0 && !state.tasks[index].ended {
                state.tasks[index].ended = true
                state.tasks[index].status.state = .canceled
                state.tasks[index].status.error = "canceled: the batch was freed"
                state.tasks[index].recordEnd()
                ended += 1
            }
            state.unfinished = 0
            state.earliestDeadline = UInt64.max
            return ended
        }
        state.notifyAll()
        return ended
    }

    /// Waits until no transport holds a slice of this batch or `deadline` passes; true when none does.
    func waitQuiet(deadline: UInt64) -> Bool {
        state.wait(deadline: deadline) { $0.outstanding == 0 ? true : nil } ?? false
    }

    /// Slices transports still hold.
    var outstandingSlices: Int { state.withLock { $0.outstanding } }

    /// The number of tasks submitted so far.
    var taskCount: Int { state.withLock { $0.tasks.count } }

    /// Status of task `index`, or nil if there is no such task.
    func status(task index: Int) -> TransferStatus? {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            _ = expire(&state, now: now)
            return index >= 0 && index < state.tasks.count ? state.tasks[index].status : nil
        }
    }

    /// Statuses of all tasks.
    var statuses: [TransferStatus] {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            _ = expire(&state, now: now)
            return state.tasks.map(\.status)
        }
    }

    /// Blocks until every task finished (or ended) or the monotonic deadline passes; true when all did.
    func waitAll(deadline: UInt64?) -> Bool {
        while true {
            let now = MonotonicClock.nanoseconds()
            let (done, wakeAt) = state.withLock { state -> (Bool, UInt64) in
                (expire(&state, now: now) || state.unfinished == 0, state.earliestDeadline)
            }
            if done { return true }
            if let deadline, now >= deadline { return false }
            let until = min(deadline ?? UInt64.max, wakeAt)
            if state.wait(deadline: until == UInt64.max ? nil : until, until: { $0.unfinished == 0 ? true : nil }) == true { return true }
        }
    }
}
