/// Planning and dispatch: every request is checked against local and remote registrations,
/// given its order of transports by the router, and sent over the first that opens; a failure
/// moves it to the next (see `Failover`).
extension TransferEngine {
    /// A request checked against local and remote registrations, bound to its order of transports.
    struct Planned {
        var request: TransferRequest
        var peer: Peer
        /// The transports to try, best first (empty for a zero-length or local request).
        var order: [any Transport]
        /// Between two ranges of this engine's own host memory: a memmove, no transport.
        var local = false
    }

    /// What planning learned about the segment of the previous request: the requests of a
    /// batch mostly name one segment, so its peer is looked up once.
    struct PlanCache {
        var segment: SegmentHandle
        var peer: Peer
        var refreshed: Bool
    }

    /// Checks every request before any is dispatched, so a bad one loses nothing.
    func plan(_ requests: [TransferRequest], hint: String?) throws -> [Planned] {
        var cache: PlanCache? = nil
        var planned: [Planned] = []
        planned.reserveCapacity(requests.count)
        for request in requests { planned.append(try plan(request, cache: &cache, hint: hint)) }
        return planned
    }

    /// Checks one request and binds it to its order of transports.
    func plan(_ request: TransferRequest, cache: inout PlanCache?, hint: String?) throws -> Planned {
        if cache?.segment != request.segment {
            cache = PlanCache(segment: request.segment, peer: try peer(request.segment), refreshed: false)
        }
        let peer = cache!.peer
        if request.length == 0 { return Planned(request: request, peer: peer, order: []) }
        if request.segment == 0, registry.isLocalHostCopy(request) {
            return Planned(request: request, peer: peer, order: [], local: true)
        }
        guard let region = registry.region(containing: request.localAddress, length: request.length) else {
            throw EngineError.addressNotRegistered(address: request.localAddress, length: request.length, side: "local")
        }
        // Looked up under the lock, without copying the descriptor (its arrays and dictionaries).
        func lookup() -> (own: String?, device: Bool)? {
            state.withLock { _ in
                guard let remote = peer.descriptor.buffer(containing: request.remoteAddress, length: request.length) else { return nil }
                return (remote.ownProtocol, !MemoryLocation.isHostAccessible(remote.name))
            }
        }
        var found = lookup()
        if found == nil, request.segment != 0, !cache!.refreshed {
            // The peer may have registered memory after we cached its descriptor.
            cache!.refreshed = true
            try? refreshSegment(request.segment)
            found = lookup()
        }
        guard let found else {
            throw EngineError.addressNotRegistered(address: request.remoteAddress, length: request.length, side: "remote (\(peer.name))")
        }
        let order = try route(to: peer, remoteProtocol: found.own, deviceMemory: found.device || !region.hostAccessible, hint: hint)
        return Planned(request: request, peer: peer, order: order)
    }

    /// The router's order for one request; the common case (host memory, no protocol of its own,
    /// no hint) is kept per peer until a transport is installed or removed or a path fails.
    func route(to peer: Peer, remoteProtocol: String?, deviceMemory: Bool, hint: String?) throws -> [any Transport] {
        let hint = try checkedHint(hint)
        let plain = remoteProtocol == nil && !deviceMemory && hint == nil
        let now = MonotonicClock.nanoseconds()
        let routerGeneration = router.generation.load(ordering: .relaxed)
        if plain, let cached = state.withLock({ state -> [any Transport]? in
            guard let route = peer.route, route.generation == state.routeGeneration &+ routerGeneration, now < route.validUntil else { return nil }
            return route.order
        }) {
            return cached
        }
        let decision = routeDecision(to: peer, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory, hint: hint, now: now)
        let order = decision.order.map(\.transport)
        guard !order.isEmpty else {
            let reasons = decision.skipped.map { "\($0.protocolName): \($0.why)" }.joined(separator: "; ")
            throw EngineError.segmentUnavailable(name: peer.name, reason: "no installed transport can reach this buffer (\(reasons))")
        }
        if plain {
            state.withLock { state in
                peer.route = CachedRoute(generation: state.routeGeneration &+ routerGeneration, validUntil: decision.validUntil, order: order)
            }
        }
        return order
    }

    /// The full decision with reasons (also what `transfer-engine route` prints).
    func routeDecision(to peer: Peer, remoteProtocol: String?, deviceMemory: Bool, hint: String?,
                       now: UInt64 = MonotonicClock.nanoseconds()) -> Router.Decision {
        let (installed, target) = state.withLock { state in
            (state.transports, Router.Target(segment: peer.name, offered: peer.descriptor.offeredProtocols,
                                             sameHost: isSameHost(peer), unreachable: peer.unreachable))
        }
        return router.decide(installed: installed, target: target, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory,
                             hint: hint, now: now)
    }

    /// Whether the peer runs on this host (shm goes first for it).
    func isSameHost(_ peer: Peer) -> Bool {
        if peer.name == segmentName { return true }
        func loopback(_ host: String) -> Bool { host == "localhost" || host.hasPrefix("127.") || host == "::1" }
        let localHost = (try? HostPort.parse(configuration.localHostname).host) ?? bindHost
        return peer.host == bindHost || peer.host == localHost || (loopback(peer.host) && (loopback(bindHost) || loopback(localHost)))
    }

    /// A transport hint naming no installed transport is dropped with one warning per name (an
    /// error under MC_STRICT_PROTOCOL=1); nil when there is none to follow.
    private func checkedHint(_ hint: String?) throws -> String? {
        guard let raw = hint, !raw.isEmpty else { return nil }
        let name = raw.lowercased()
        if state.withLock({ $0.transports.contains { $0.protocolName == name } }) { return name }
        if settings.strictProtocol {
            throw EngineError.protocolUnavailable(protocolName: name, reason: "transport_hint names a transport this engine has not installed "
                                                  + "(installed: \(activeProtocols.joined(separator: ",")))")
        }
        let first = state.withLock { $0.warnedHints.insert(name).inserted }
        if first {
            logger.warning("transport_hint '\(name)' names no installed transport (installed: \(activeProtocols.joined(separator: ","))); routing as usual. Set MC_STRICT_PROTOCOL=1 to make this an error")
        }
        return nil
    }

    /// Submits requests into a batch without blocking on I/O. Every request is validated first;
    /// if any is invalid nothing is submitted. `transportHint` puts that transport first.
    public func submit(_ requests: [TransferRequest], to batchID: BatchID, transportHint: String? = nil) throws {
        try submit(planned: try plan(requests, hint: transportHint), to: batchID)
    }

    /// Dispatches already validated requests.
    func submit(planned: [Planned], to batchID: BatchID) throws {
        let batch = try self.batch(batchID)
        // Each request goes to the first transport of its order whose link opens.
        var firstLink: [(index: Int, link: any TransportPeer)?] = []
        var failures: [String?] = []
        firstLink.reserveCapacity(planned.count)
        for p in planned {
            var chosen: (Int, any TransportPeer)?
            var why: [String] = []
            for (index, transport) in p.order.enumerated() {
                do { chosen = (index, try link(to: p.peer, over: transport)); break } catch { why.append("\(transport.protocolName): \(error)") }
            }
            firstLink.append(chosen)
            failures.append(chosen == nil && !p.order.isEmpty ? why.joined(separator: "; ") : nil)
        }
        let sliceCounts = planned.indices.map { i -> Int in
            let p = planned[i]
            if p.request.length == 0 { return 0 }
            guard !p.local, let (index, _) = firstLink[i] else { return 1 }
            let piece = p.order[index].splitsRequests ? UInt64.max : settings.splitSize
            return Int((p.request.length - 1) / piece + 1)
        }
        let longest = planned.reduce(UInt64(0)) { max($0, $1.request.length) }
        let deadline = MonotonicClock.nanoseconds() + syncTimeout(bytes: longest)
        let first = try batch.addTasks(sliceCounts: sliceCounts, deadline: deadline)
        var work: [ObjectIdentifier: (any TransportPeer, [TransferSlice])] = [:]
        for (i, p) in planned.enumerated() where p.request.length > 0 {
            let r = p.request
            let task = first + i
            if p.local {
                let copied = registry.copyLocally(r)
                batch.sliceFinished(task: task, bytes: copied ? r.length : 0,
                                    error: copied ? nil : "local copy of \(r.length) bytes: a range was unregistered meanwhile")
                continue
            }
            guard let (index, link) = firstLink[i] else {
                batch.sliceFinished(task: task, bytes: 0, error: "\(r.operation) of \(r.length) bytes to \(p.peer.name): no path opened (\(failures[i] ?? ""))")
                continue
            }
            let transport = p.order[index]
            let token: CompletionToken
            if index + 1 < p.order.count {
                token = failover(batch: batch, task: task, order: Array(p.order[index...]), peer: p.peer, deadline: deadline).token
            } else {
                token = CompletionToken(batch: batch, task: task, failover: nil)
            }
            let piece = transport.splitsRequests ? UInt64.max : settings.splitSize
            var offset: UInt64 = 0
            var slices: [TransferSlice] = []
            while offset < r.length {
                let size = min(piece, r.length - offset)
                slices.append(TransferSlice(operation: r.operation, localAddress: r.localAddress + offset, remoteAddress: r.remoteAddress + offset,
                                            length: size, token: token))
                offset += size
            }
            work[ObjectIdentifier(link), default: (link, [])].1 += slices
        }
        for (link, slices) in work.values { link.submit(slices) }
    }

    /// The failover of one batched request over `order` (its first entry is where it starts).
    private func failover(batch: Batch, task: Int, order: [any Transport], peer: Peer, deadline: UInt64) -> Failover {
        Failover(batch: batch, task: task, order: order, segment: peer.name, deadline: deadline, router: router, splitSize: settings.splitSize,
                 connector: { [weak self] transport in
                     guard let self else { throw EngineError.invalidArgument("the engine shut down") }
                     return try self.link(to: peer, over: transport)
                 },
                 onFailover: { [logger, cooldown = settings.pathCooldownMs, name = peer.name] from, to, reason in
                     logger.warning("\(from) path to \(name) failed (\(reason)); failing over to \(to), \(from) tried last for \(cooldown) ms")
                 })
    }
}
