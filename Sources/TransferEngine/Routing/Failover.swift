/// The remaining paths of the requests one submit sent to one peer with one order: when a
/// slice fails on a transport, it is resubmitted on the next one in the order (within the
/// deadline), and the failed path is marked for cooldown. A task fails only when no path is
/// left or the deadline passed; its error names every path tried and why each failed.
///
/// One object serves every request of the submit that shares the order (no allocation per
/// request); a request's own failover state exists only once one of its slices failed.
final class Failover: @unchecked Sendable {
    /// Opens (or finds) the link to the peer over one transport.
    typealias Connector = (any Transport) throws -> any TransportPeer

    /// One failed-over task's progress along the order.
    private struct TaskState {
        /// Index in `order` of the path new retries go to.
        var current = 0
        /// "protocol: reason" for every path that failed, in order.
        var failures: [String] = []
        var failedProtocols: Set<String> = []
    }

    private let order: [any Transport]
    private let segment: String
    private let deadline: UInt64
    private let router: Router
    private let connector: Connector
    private let splitSize: UInt64
    private let onFailover: @Sendable (String, String, String) -> Void
    private let tasks = ConditionLock<[Int: TaskState]>([:])
    /// Failed slices waiting for the worker, and whether it runs. The thread that reports a
    /// failure (a plugin's poller, a TCP lane, a synchronous caller harvesting) must not block on
    /// opening the next path (a handshake can take seconds): a worker thread does it.
    private let queue = ConditionLock<(pending: [(slice: TransferSlice, task: Int, protocolName: String, reason: String)], running: Bool)>(([], false))
    /// The batch its requests belong to.
    let batch: Batch

    /// `order` is the requests' paths, the first being the one their slices go to first.
    /// `onFailover(from, to, reason)` is told about each path's first failure (logging).
    init(batch: Batch, order: [any Transport], segment: String, deadline: UInt64, router: Router, splitSize: UInt64,
         connector: @escaping Connector, onFailover: @escaping @Sendable (String, String, String) -> Void) {
        self.batch = batch
        self.order = order
        self.segment = segment
        self.deadline = deadline
        self.router = router
        self.splitSize = splitSize
        self.connector = connector
        self.onFailover = onFailover
    }

    /// The token for the slices of task `task`.
    func token(task: Int) -> CompletionToken { CompletionToken(failover: self, task: task) }

    /// A slice of `task` failed on `protocolName`: resubmit it on the next path (on the worker
    /// thread), or end its task.
    func sliceFailed(_ slice: TransferSlice, task: Int, on protocolName: String, reason: String) {
        if batch.isCanceled {
            batch.sliceFinished(task: task, bytes: 0, error: reason)
            return
        }
        let start = queue.withLock { queue -> Bool in
            queue.pending.append((slice, task, protocolName, reason))
            if queue.running { return false }
            queue.running = true
            return true
        }
        guard start else { return }
        do {
            try OSThread.spawn(name: "te-failover") { [self] in drainQueue() }
        } catch {
            drainQueue()  // no thread: do it here rather than lose the slices
        }
    }

    /// Moves every queued slice to its next path; stops when the queue is empty.
    private func drainQueue() {
        while let item = queue.withLock({ queue -> (slice: TransferSlice, task: Int, protocolName: String, reason: String)? in
            if queue.pending.isEmpty {
                queue.running = false
                return nil
            }
            return queue.pending.removeFirst()
        }) {
            move(item.slice, task: item.task, failedOn: item.protocolName, reason: item.reason)
        }
    }

    private func move(_ slice: TransferSlice, task: Int, failedOn protocolName: String, reason: String) {
        if batch.isCanceled {
            batch.sliceFinished(task: task, bytes: 0, error: reason)
            return
        }
        var failedOn = protocolName
        var why = reason
        while true {
            let next: (any Transport)? = tasks.withLock { tasks in
                var state = tasks[task] ?? TaskState()
                defer { tasks[task] = state }
                if !state.failedProtocols.contains(failedOn) {
                    state.failedProtocols.insert(failedOn)
                    state.failures.append("\(failedOn): \(why)")
                }
                while state.current < order.count && state.failedProtocols.contains(order[state.current].protocolName) {
                    state.current += 1
                }
                return state.current < order.count ? order[state.current] : nil
            }
            let newlyFailed = router.markFailed(failedOn, segment: segment)
            guard let next, MonotonicClock.nanoseconds() < deadline else {
                let summary = tasks.withLock { $0[task]?.failures.joined(separator: "; ") ?? "" }
                let ending = next == nil ? "every path failed" : "the deadline passed before another path could be tried"
                batch.sliceFinished(task: task, bytes: 0, error: "\(slice.operation) of \(slice.length) bytes to \(segment): \(ending) (\(summary))")
                return
            }
            if newlyFailed { onFailover(failedOn, next.protocolName, why) }
            do {
                let link = try connector(next)
                link.submit(pieces(of: slice, task: task, for: next))
                return
            } catch {
                failedOn = next.protocolName
                why = "\(error)"
            }
        }
    }

    /// The slice cut to the sizes `transport` takes (a plugin that splits requests took it whole).
    private func pieces(of slice: TransferSlice, task: Int, for transport: any Transport) -> [TransferSlice] {
        var pieces = [slice]
        if !transport.splitsRequests && slice.length > splitSize {
            pieces.removeAll()
            var offset: UInt64 = 0
            while offset < slice.length {
                var piece = slice
                piece.localAddress += offset
                piece.remoteAddress += offset
                piece.length = min(splitSize, slice.length - offset)
                pieces.append(piece)
                offset += piece.length
            }
            // The task expects one end per original slice: extra pieces are announced first.
            batch.addSlices(task: task, count: pieces.count - 1)
        }
        batch.countResubmitted(task: task, slices: pieces.count)
        return pieces
    }
}
