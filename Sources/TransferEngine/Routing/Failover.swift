import Synchronization

/// A request's remaining paths: when a slice fails on one transport, it is resubmitted on the
/// next one in the request's order (within the request's deadline), and the failed path is
/// marked for cooldown. The task fails only when no path is left or the deadline passed; its
/// error names every path tried and why each failed.
final class Failover: @unchecked Sendable {
    /// Opens (or finds) the link to the peer over one transport.
    typealias Connector = (any Transport) throws -> any TransportPeer

    private struct State {
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
    private let state = Mutex(State())
    private let batch: Batch
    private let task: Int

    /// `order` is the request's paths, the first being the one its slices go to first.
    /// `onFailover(from, to, reason)` is told about each move (logging).
    init(batch: Batch, task: Int, order: [any Transport], segment: String, deadline: UInt64, router: Router, splitSize: UInt64,
         connector: @escaping Connector, onFailover: @escaping @Sendable (String, String, String) -> Void) {
        self.batch = batch
        self.task = task
        self.order = order
        self.segment = segment
        self.deadline = deadline
        self.router = router
        self.splitSize = splitSize
        self.connector = connector
        self.onFailover = onFailover
    }

    /// The token for the request's slices.
    var token: CompletionToken { CompletionToken(batch: batch, task: task, failover: self) }

    /// A slice failed on `protocolName`: resubmit it on the next path, or end its task.
    func sliceFailed(_ slice: TransferSlice, on protocolName: String, reason: String) {
        var failedOn = protocolName
        var why = reason
        while true {
            let next: (any Transport)? = state.withLock { state in
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
                let summary = state.withLock { $0.failures.joined(separator: "; ") }
                let ending = next == nil ? "every path failed" : "the deadline passed before another path could be tried"
                batch.sliceFinished(task: task, bytes: 0, error: "\(slice.operation) of \(slice.length) bytes to \(segment): \(ending) (\(summary))")
                return
            }
            if newlyFailed { onFailover(failedOn, next.protocolName, why) }
            do {
                let link = try connector(next)
                link.submit(pieces(of: slice, for: next))
                return
            } catch {
                failedOn = next.protocolName
                why = "\(error)"
            }
        }
    }

    /// The slice cut to the sizes `transport` takes (a plugin that splits requests took it whole).
    private func pieces(of slice: TransferSlice, for transport: any Transport) -> [TransferSlice] {
        if transport.splitsRequests || slice.length <= splitSize { return [slice] }
        // The task expects one end per original slice: extra pieces are announced first.
        var pieces: [TransferSlice] = []
        var offset: UInt64 = 0
        while offset < slice.length {
            var piece = slice
            piece.localAddress += offset
            piece.remoteAddress += offset
            piece.length = min(splitSize, slice.length - offset)
            pieces.append(piece)
            offset += piece.length
        }
        batch.addSlices(task: task, count: pieces.count - 1)
        return pieces
    }
}
