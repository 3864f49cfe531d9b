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
        if planned.local {
            guard registry.copyLocally(request) else {
                throw EngineError.addressNotRegistered(address: remoteAddress, length: length, side: "local (unregistered during the copy)")
            }
            return
        }
        let deadline = MonotonicClock.nanoseconds() + syncTimeout(bytes: length)
        var failures: [String] = []
        for (index, transport) in planned.order.enumerated() {
            if index > 0 && MonotonicClock.nanoseconds() >= deadline { break }
            let link: any TransportPeer
            do { link = try self.link(to: planned.peer, over: transport) } catch {
                failures.append("\(transport.protocolName): \(error)")
                continue
            }
            guard let outcome = link.transferSync(operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length,
                                                  deadline: deadline) else {
                // This transport runs a request of this size through its queue: a temporary batch from here on.
                var rest = planned
                rest.order = Array(planned.order[index...])
                return try runSync([rest], earlierFailures: failures)
            }
            switch outcome {
            case .completed:
                return
            case .timedOut:
                throw EngineError.timeout("\(operation) of \(length) bytes to \(planned.peer.name) over \(transport.protocolName)")
            case .failed(let reason):
                failures.append(planned.order.count > 1 ? "\(transport.protocolName): \(reason)" : reason)
                if router.markFailed(transport.protocolName, segment: planned.peer.name), index + 1 < planned.order.count {
                    logger.warning("\(transport.protocolName) path to \(planned.peer.name) failed (\(reason)); failing over to \(planned.order[index + 1].protocolName), \(transport.protocolName) tried last for \(settings.pathCooldownMs) ms")
                }
            }
        }
        if failures.count == 1 && planned.order.count == 1 { throw EngineError.transferFailed(failures[0]) }
        throw EngineError.transferFailed("\(operation) of \(length) bytes to \(planned.peer.name): every path failed (\(failures.joined(separator: "; ")))")
    }

    /// How many synchronous plugin transfers were completed by a thread other than their caller.
    var syncCompletionsReapedElsewhere: Int {
        state.withLock { $0.transports }.reduce(0) { sum, transport in
            sum + ((transport as? PluginTransport)?.syncReapedElsewhere.load(ordering: .relaxed) ?? 0)
        }
    }

    /// Submits requests in a temporary batch and waits for all of them.
    public func transferBatchSync(_ requests: [TransferRequest], transportHint: String? = nil) throws {
        try runSync(try plan(requests, hint: transportHint))
    }

    /// Submits validated requests in a temporary batch and waits for all of them.
    func runSync(_ planned: [Planned], earlierFailures: [String] = []) throws {
        let id = try allocateBatch(capacity: max(1, planned.count))
        defer { try? freeBatch(id) }
        try submit(planned: planned, to: id)
        for transport in state.withLock({ $0.transports }) { (transport as? PluginTransport)?.harvest() }
        let bytes = planned.reduce(0) { $0 + $1.request.length }
        guard try wait(batch: id, timeoutNs: syncTimeout(bytes: bytes)) else {
            throw EngineError.timeout("batch of \(planned.count) transfers (\(bytes) bytes)")
        }
        for status in try statuses(batch: id) where status.state != .completed {
            let text = status.error ?? "\(status.state)"
            let full = earlierFailures.isEmpty ? text : "\(earlierFailures.joined(separator: "; ")); \(text)"
            if status.state == .timeout { throw EngineError.timeout("batch of \(planned.count) transfers (\(bytes) bytes): \(full)") }
            throw EngineError.transferFailed(full)
        }
    }
}
