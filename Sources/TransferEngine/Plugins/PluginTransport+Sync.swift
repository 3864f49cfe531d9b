import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Synchronous requests through a plugin: the caller submits one request and polls the plugin
/// for its completion on its own thread, with no batch and no hand-off to the poller thread.
extension PluginTransport {
    /// A synchronous request: harvested on this thread when the plugin splits requests itself
    /// or the request is small; nil (run it through submit) otherwise.
    func transferSync(_ op: TransferRequest.Operation, local: UInt64, peer: UInt64, remote: UInt64, length: UInt64,
                      deadline: UInt64) -> SyncOutcome? {
        guard length <= inlineLimit || splitsRequests else { return nil }
        return transferOne(op, local: local, peer: peer, remote: remote, length: length, spinNs: syncSpinNs, small: length <= 65536,
                           deadline: deadline)
    }

    /// One request for a synchronous caller, polled for on the caller's thread until it completes
    /// or the deadline passes: the caller gets its completion straight from the plugin, with no
    /// batch, and the poller thread stays parked meanwhile (each thread hand-off costs a wake-up;
    /// under emulation one costs about what a 4 KiB transfer does).
    /// It busy-polls (poll with no wait) first, as verbs benchmarks do: a completion reaped that
    /// way needs no thread wake-up at all. The busy-poll lasts `spinNs`; for a `small` transfer
    /// (latency-bound: a wake-up would cost a share of it) twice the recent average of small
    /// transfers where that is longer, up to 2 ms: a fabric that needs 300 us per 4 KiB
    /// (soft-RoCE) keeps its callers polling, while on fast NICs nothing changes.
    func transferOne(_ op: TransferRequest.Operation, local: UInt64, peer: UInt64, remote: UInt64, length: UInt64,
                     spinNs: UInt64, small: Bool, deadline: UInt64) -> SyncOutcome {
        // Inside the gate once for the whole request (its loop ends as soon as shutdown begins).
        entered {
            transferOneEntered(op, local: local, peer: peer, remote: remote, length: length, spinNs: spinNs, small: small, deadline: deadline)
        } ?? .failed("\(plugin.info.name): engine shut down")
    }

    private func transferOneEntered(_ op: TransferRequest.Operation, local: UInt64, peer: UInt64, remote: UInt64, length: UInt64,
                                    spinNs: UInt64, small: Bool, deadline: UInt64) -> SyncOutcome {
        let start = MonotonicClock.nanoseconds()
        guard let cookie = inFlight.withLock({ state -> UInt64? in
            if state.stopping { return nil }
            state.syncCallers += 1
            defer { state.next += 1 }
            let cookie = state.next | Self.syncCookie
            state.syncWaiting.append(cookie)
            return cookie
        }) else { return .failed("\(plugin.info.name): engine shut down") }
        var request = te_request(opcode: op == .read ? TE_OP_READ : TE_OP_WRITE, flags: 0, local_addr: local, peer: peer,
                                 remote_addr: remote, length: length, cookie: cookie)
        // Set when this thread reaps its own completion; another thread's reap lands in syncResults.
        var own: Ending? = nil
        let (accepted, submitted) = withUnsafePointer(to: &request) { submitRequests(UnsafeBufferPointer(start: $0, count: 1), gated: false) }
        if accepted == 0 { own = (submitted, submitFailure(submitted)) }
        // One look first: a plugin that completed the request inside submit (shm's small copies)
        // needs no decision about waiting.
        if own == nil { _ = drain(timeoutNs: 0, mine: cookie, own: &own, gated: false) }
        // Whether to busy-poll at all: measured (WaitPolicy), since a busy-poll beside busy cores
        // holds the core the completing thread needs. Asked, and told, only when a wait follows.
        let waited = own == nil
        let spins = !small || !waited || syncWaitPolicy.withLock { $0.spins }
        if own == nil {
            let adaptive = small ? 2 * syncAverageNs.load(ordering: .relaxed) : 0
            let spinUntil = spins ? start + (adaptive > spinNs && adaptive <= Self.maxAdaptiveSpinNs ? adaptive : spinNs) : start
            // Past the deadline the plugin still owns the caller's buffer: wait (a bounded while)
            // for it to give the request back before telling the caller it is over.
            let (end, overflow) = deadline.addingReportingOverflow(releaseGraceNs)
            let giveUp = overflow ? UInt64.max : end
            while own == nil && !isShutDown {
                let now = MonotonicClock.nanoseconds()
                if now >= giveUp { break }
                let spinning = now < spinUntil
                if drain(timeoutNs: spinning ? 0 : 200_000, mine: cookie, own: &own, gated: false) != TE_OK { break }
                if own != nil { break }
                if spinning {
                    sched_yield()
                } else if inFlight.withLock({ state in state.syncResults.contains { $0.cookie == cookie } }) {
                    break  // another thread reaped it (looked for once the busy-poll is over, then per wait)
                }
            }
        }
        let (result, wakePoller) = inFlight.withLock { state -> (Ending?, Bool) in
            state.syncCallers -= 1
            if let index = state.syncWaiting.firstIndex(of: cookie) { state.syncWaiting.remove(at: index) }
            var theirs: Ending? = nil
            if let index = state.syncResults.firstIndex(where: { $0.cookie == cookie }) {
                let reaped = state.syncResults.remove(at: index)
                theirs = (reaped.status, reaped.reason)
            }
            return (own ?? theirs, state.pollerParked && state.pollerNeeded)
        }
        if wakePoller { inFlight.notifyAll() }
        guard let result else {
            if isShutDown { return .failed("\(plugin.info.name): engine shut down") }
            logger.warning("\(plugin.info.name): a synchronous \(op) of \(length) bytes timed out and the plugin still holds it \(releaseGraceNs / 1_000_000) ms later: its buffer may still be read or written")
            return .timedOut
        }
        guard result.status == TE_OK else {
            if MonotonicClock.nanoseconds() >= deadline { return .timedOut }
            let text = failureText(result.status, result.reason)!
            return Self.isRequestRefusal(result.status) ? .rejected(text) : .failed(text)
        }
        if small {
            let average = syncAverageNs.load(ordering: .relaxed)
            let took = MonotonicClock.nanoseconds() &- start
            syncAverageNs.store(average == 0 ? took : (average * 7 + took) / 8, ordering: .relaxed)
            if waited { syncWaitPolicy.withLock { $0.record(took, spun: spins) } }
        }
        return .completed
    }
}
