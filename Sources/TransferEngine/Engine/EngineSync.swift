/// Synchronous transfers: one request runs on the calling thread over the first path of its
/// order that works (TCP inline on a pooled connection, a plugin harvested by the caller), and
/// moves to the next path when one fails; larger ones run as a temporary batch.
extension TransferEngine {
    /// Runs one transfer to completion. `transportHint` puts that transport first (upstream's
    /// `transport_hint`).
    public func transferSync(_ operation: TransferRequest.Operation, localAddress: UInt64, segment: SegmentHandle,
                             remoteAddress: UInt64, length: UInt64, transportHint: String? = nil) throws {
        let request = TransferRequest(operation: operation, localAddress: localAddress, segment: segment, remoteAddress: remoteAddress, length: length)
        var cache: PlanCache? = nil
        let planned = try plan(request, cache: &cache, hint: transportHint)
        if length == 0 { return }
        guard let metrics else {
            return try transferSync(planned, operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length)
        }
        try meteredSync(planned, metrics, operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length)
    }

    /// A synchronous transfer counted in the metrics.
    private func meteredSync(_ planned: borrowing Planned, _ metrics: EngineMetrics, _ operation: TransferRequest.Operation,
                             localAddress: UInt64, remoteAddress: UInt64, length: UInt64) throws {
        let meter = planned.syncMeter ?? keptSyncMeter(metrics, planned, operation)
        let startedAt = MonotonicClock.nanoseconds()
        meter.started()
        do {
            try transferSync(planned, operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length, now: startedAt)
        } catch {
            var state = TransferState.failed
            if let error = error as? EngineError, case .timeout = error { state = .timeout }
            meter.ended(state, transferred: 0, startedAt: startedAt)
            throw error
        }
        meter.ended(.completed, transferred: length, startedAt: startedAt)
    }

    /// The meter of a synchronous request, kept with its peer for the next ones (the route's
    /// first transport and the operation name it; planning hands it out with the cached route).
    private func keptSyncMeter(_ metrics: EngineMetrics, _ planned: Planned, _ operation: TransferRequest.Operation) -> RequestMeter {
        let meter = metrics.meter(peer: planned.peer, operation: operation, transport: planned.order.first, local: planned.local, batched: false)
        // Kept only for requests planning can hand it to again (the peer's common kept route).
        if planned.keptRoute, let first = planned.order.first {
            state.withLock { _ in
                let peer = planned.peer
                let id = ObjectIdentifier(first)
                if peer.syncMeters.count < 16, !peer.syncMeters.contains(where: { $0.id == id && $0.operation == operation }) {
                    peer.syncMeters.append((first, id, operation, meter))
                }
            }
        }
        return meter
    }

    /// One planned synchronous transfer (not counted in the metrics here); `now`: the monotonic
    /// clock when the caller already read it.
    private func transferSync(_ planned: Planned, _ operation: TransferRequest.Operation, localAddress: UInt64, remoteAddress: UInt64,
                              length: UInt64, now: UInt64? = nil) throws {
        let request = planned.request
        if planned.local {
            guard registry.copyLocally(request) else {
                throw EngineError.addressNotRegistered(address: remoteAddress, length: length, side: "local (unregistered during the copy)")
            }
            return
        }
        let deadline = (now ?? MonotonicClock.nanoseconds()) + syncTimeout(bytes: length)
        // The common case first, with nothing else in the way: the route was cached with its first
        // link open, and the request completes there.
        var firstOutcome: SyncOutcome? = nil
        if let first = planned.firstLink {
            guard let outcome = first.transferSync(operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length,
                                                   deadline: deadline) else { return try runSync([planned], metered: false) }
            if outcome == .completed { return }
            firstOutcome = outcome
        }
        try transferSync(planned, operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length, deadline: deadline,
                         firstOutcome: firstOutcome)
    }

    /// The rest of a synchronous transfer: each path of its order in turn (`firstOutcome`: how the
    /// first one already ended), until one completes, refuses the request or the deadline passes.
    private func transferSync(_ planned: Planned, _ operation: TransferRequest.Operation, localAddress: UInt64, remoteAddress: UInt64,
                              length: UInt64, deadline: UInt64, firstOutcome: SyncOutcome?) throws {
        let order = planned.order
        var failures: [String] = []
        var index = 0
        while index < order.count {
            if index > 0 && MonotonicClock.nanoseconds() >= deadline { break }
            let outcome: SyncOutcome
            if index == 0, let firstOutcome {
                outcome = firstOutcome
            } else {
                let link: any TransportPeer
                do { link = try self.link(to: planned.peer, over: order[index]) } catch {
                    failures.append("\(order[index].protocolName): \(error)")
                    if index + 1 < order.count { metrics?.failover(from: order[index].protocolName, to: order[index + 1].protocolName) }
                    index += 1
                    continue
                }
                guard let result = link.transferSync(operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length,
                                                     deadline: deadline) else {
                    // This transport runs a request of this size through its queue: a temporary batch from here on.
                    var rest = planned
                    rest.route = index == 0 ? planned.route : RouteOrder(Array(order[index...]))
                    return try runSync([rest], earlierFailures: failures, metered: false)
                }
                outcome = result
            }
            if outcome == .completed { return }
            if case .rejected(let reason) = outcome { throw EngineError.transferFailed(reason) }
            let name = order[index].protocolName
            guard case .failed(let reason) = outcome else {
                throw EngineError.timeout("\(operation) of \(length) bytes to \(planned.peer.name) over \(name)")
            }
            failures.append(order.count > 1 ? "\(name): \(reason)" : reason)
            if index + 1 < order.count { metrics?.failover(from: name, to: order[index + 1].protocolName) }
            if router.markFailed(name, segment: planned.peer.name), index + 1 < order.count {
                logger.warning("\(Self.failoverLine(from: name, to: order[index + 1].protocolName, segment: planned.peer.name, reason: reason, cooldownMs: settings.pathCooldownMs))", metadata: ["peer": "\(planned.peer.name)"])
            }
            index += 1
        }
        if failures.count == 1 && order.count == 1 { throw EngineError.transferFailed(failures[0]) }
        throw EngineError.transferFailed("\(operation) of \(length) bytes to \(planned.peer.name): every path failed (\(failures.joined(separator: "; ")))")
    }

    /// How many synchronous plugin transfers were completed by a thread other than their caller.
    var syncCompletionsReapedElsewhere: Int {
        state.withLock { $0.transports }.reduce(0) { sum, transport in
            sum + ((transport as? PluginTransport)?.syncReapedElsewhere.load(ordering: .relaxed) ?? 0)
        }
    }

    /// Completions plugins reported for requests not in flight (twice, or never submitted), and
    /// for synchronous requests whose caller no longer waited (after a timeout, or twice): a
    /// plugin bug when no transfer timed out. Counted for `plugins --check`.
    public var pluginStrayCompletions: Int {
        state.withLock { $0.transports }.reduce(0) { sum, transport in
            guard let plugin = transport as? PluginTransport else { return sum }
            return sum + plugin.strayCompletions.load(ordering: .relaxed) + plugin.unclaimedSyncCompletions.load(ordering: .relaxed)
        }
    }

    /// Submits requests in a temporary batch and waits for all of them.
    public func transferBatchSync(_ requests: [TransferRequest], transportHint: String? = nil) throws {
        try runSync(try plan(requests, hint: transportHint))
    }

    /// Submits validated requests in a temporary batch and waits for all of them.
    func runSync(_ planned: [Planned], earlierFailures: [String] = [], metered: Bool = true) throws {
        let id = try allocateBatch(capacity: max(1, planned.count))
        // The caller may reuse its buffers once this returns: a batch a transport still holds part
        // of is not freed quietly; the error says so (the batch stays until it can be freed).
        var freed = false
        defer { if !freed { try? freeBatch(id) } }
        func release() throws {
            freed = true
            do { try freeBatch(id) } catch {
                throw EngineError.transferFailed("a transport still holds part of this request after it ended; do not reuse its buffers yet: \(error)")
            }
        }
        try submit(planned: planned, to: id, metered: metered)
        for transport in state.withLock({ $0.transports }) { (transport as? PluginTransport)?.harvest() }
        let bytes = planned.reduce(0) { $0 + $1.request.length }
        guard try wait(batch: id, timeoutNs: syncTimeout(bytes: bytes)) else {
            try release()
            throw EngineError.timeout("batch of \(planned.count) transfers (\(bytes) bytes)")
        }
        let statuses = try statuses(batch: id)
        try release()
        for status in statuses where status.state != .completed {
            let text = status.error ?? "\(status.state)"
            let full = earlierFailures.isEmpty ? text : "\(earlierFailures.joined(separator: "; ")); \(text)"
            if status.state == .timeout { throw EngineError.timeout("batch of \(planned.count) transfers (\(bytes) bytes): \(full)") }
            throw EngineError.transferFailed(full)
        }
    }
}
