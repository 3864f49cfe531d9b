import CTransportABI

/// Completions: polling the plugin and ending each completed slice through its token.
extension PluginTransport {
    /// Collects completions that are already available, on the caller's thread (a
    /// synchronous transfer then needs no hand-off to the poller thread).
    func harvest() {
        if isShutDown { return }
        _ = drain(timeoutNs: 0)
    }

    /// One poll call; finishes every completion it returns. Returns the poll status.
    func drain(timeoutNs: UInt64) -> Int32 {
        var unused: Ending? = nil
        return drain(timeoutNs: timeoutNs, mine: 0, own: &unused)
    }

    /// One poll call; finishes every completion it returns, except that of cookie `mine` (a
    /// synchronous caller's, not 0), whose status goes to `own` without taking the lock.
    func drain(timeoutNs: UInt64, mine: UInt64, own: inout Ending?, gated: Bool = true) -> Int32 {
        // Stack storage (the standard library keeps up to 1 KiB on the stack): a synchronous
        // caller spins through here, and a heap allocation per call showed up.
        withUnsafeTemporaryAllocation(of: te_completion.self, capacity: 32) { buffer in
            var count = 0
            let stride = MemoryLayout<te_completion>.stride
            let result: Int32?
            if gated {
                result = entered { d.poll!(instance, buffer.baseAddress, buffer.count, stride, timeoutNs, &count) }
            } else {
                result = d.poll!(instance, buffer.baseAddress, buffer.count, stride, timeoutNs, &count)
            }
            guard let status = result else { return TE_OK }
            guard status == TE_OK else { return status }
            let completions = UnsafeBufferPointer(rebasing: buffer.prefix(min(count, buffer.count)))
            if completions.count == 1 {
                if mine != 0 && completions[0].cookie == mine { own = (completions[0].status, nil) }
                else { finish(cookie: completions[0].cookie, status: completions[0].status, bytes: completions[0].bytes) }
            } else if !completions.isEmpty {
                finish(completions, mine: mine, own: &own)
            }
            return TE_OK
        }
    }

    func finish(cookie: UInt64, status: Int32, bytes: UInt64, reason: String? = nil) {
        guard let slice = inFlight.withLock({ take(&$0, cookie: cookie, status: status, reason: reason) })
        else { return }
        slice.token.finish(slice, on: protocolName, error: failureText(status, reason), rejected: Self.isRequestRefusal(status))
    }

    /// The slice of a completed `cookie`, taken out of the in-flight table (lock held); nil for a
    /// synchronous caller's cookie, whose result is left where that caller looks (unless it
    /// stopped waiting, timed out).
    private func take(_ state: inout State, cookie: UInt64, status: Int32, reason: String?) -> TransferSlice? {
        if cookie & Self.syncCookie != 0 {
            if state.syncWaiting.contains(cookie) {
                state.syncResults.append(SyncResult(cookie: cookie, status: status, reason: reason))
                syncReapedElsewhere.add(1, ordering: .relaxed)
            } else {
                unclaimedSyncCompletions.add(1, ordering: .relaxed)
            }
            return nil
        }
        guard let slice = state.slices.removeValue(forKey: cookie) else {
            if strayCompletions.add(1, ordering: .relaxed).oldValue == 0 {
                logger.warning("\(plugin.info.name): poll reported cookie \(cookie), which is not in flight (reported twice, or never submitted): a plugin bug")
            }
            return nil
        }
        return slice
    }

    /// Several completions of one poll: their slices taken under one lock, and the successes
    /// reported per batch under one lock each (a lock and a wake-up per completion cost more
    /// than the copy of a small slice).
    private func finish(_ completions: UnsafeBufferPointer<te_completion>, mine: UInt64, own: inout Ending?) {
        var taken: [(TransferSlice, te_completion)] = []
        taken.reserveCapacity(completions.count)
        inFlight.withLock { state in
            for completion in completions {
                if mine != 0 && completion.cookie == mine { own = (completion.status, nil); continue }
                if let slice = take(&state, cookie: completion.cookie, status: completion.status, reason: nil) {
                    taken.append((slice, completion))
                }
            }
        }
        var reports: [ObjectIdentifier: (Batch, [(task: Int, bytes: UInt64, error: String?)])] = [:]
        for (slice, completion) in taken {
            if completion.status == TE_OK {
                let batch = slice.token.batch
                reports[ObjectIdentifier(batch), default: (batch, [])].1.append((slice.token.task, slice.length, nil))
            } else {
                slice.token.finish(slice, on: protocolName, error: failureText(completion.status, nil), rejected: Self.isRequestRefusal(completion.status))
            }
        }
        for (batch, slices) in reports.values { batch.slicesFinished(slices) }
    }
}
