/// Planning and dispatch: every request is checked against local and remote registrations,
/// given its order of transports by the router, and sent over the first that opens; a failure
/// moves it to the next (see `Failover`).
extension TransferEngine {
    /// A request checked against local and remote registrations, bound to its order of transports.
    struct Planned {
        var request: TransferRequest
        var peer: Peer
        /// The transports to try, best first (empty for a zero-length or local request).
        var route: RouteOrder
        var order: [any Transport] { route.transports }
        /// Between two ranges of this engine's own host memory: a memmove, no transport.
        var local = false
        /// The link over the first transport of the order, when planning found it already open.
        var firstLink: (any TransportPeer)? = nil
        /// The meter of a synchronous request over the first transport, when planning found it kept.
        var syncMeter: RequestMeter? = nil
        /// The route came from the peer's kept common route (the one planning hands meters out with).
        var keptRoute = false
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
        if request.length == 0 { return Planned(request: request, peer: peer, route: .none) }
        if request.segment == 0, registry.isLocalHostCopy(request) {
            return Planned(request: request, peer: peer, route: .none, local: true)
        }
        guard let region = registry.region(containing: request.localAddress, length: request.length) else {
            throw EngineError.addressNotRegistered(address: request.localAddress, length: request.length, side: "local")
        }
        // Looked up under one lock acquisition, without copying the descriptor (its arrays and
        // dictionaries): the buffer's own protocol and memory kind, and the peer's cached route
        // when this request can use it.
        let routerGeneration = router.generation.load(ordering: .relaxed)
        let plainLocal = region.hostAccessible && (hint ?? "").isEmpty
        let metered = metrics != nil
        func lookup() -> (own: String?, device: Bool, cached: RouteOrder?, link: (any TransportPeer)?, meter: RequestMeter?)? {
            state.withLock { state in
                // Fields read in place: copying the buffer entry (its name, keys) costs retains per request.
                guard let index = peer.descriptor.buffers.firstIndex(where: { $0.contains(address: request.remoteAddress, length: request.length) })
                else { return nil }
                let own = peer.descriptor.buffers[index].ownProtocol
                let hostMemory = peer.descriptor.buffers[index].hostAccessible
                if plainLocal, own == nil, hostMemory, let route = peer.route,
                   route.generation == state.routeGeneration, route.routerGeneration == routerGeneration,
                   route.validUntil == UInt64.max || MonotonicClock.nanoseconds() < route.validUntil {
                    var meter: RequestMeter? = nil
                    if metered, let first = route.order.transports.first {
                        let id = ObjectIdentifier(first)
                        for i in peer.syncMeters.indices where peer.syncMeters[i].id == id && peer.syncMeters[i].operation == request.operation {
                            meter = peer.syncMeters[i].meter
                            break
                        }
                    }
                    return (nil, false, route.order, route.firstLink, meter)
                }
                return (own, !hostMemory, nil, nil, nil)
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
        if let cached = found.cached {
            return Planned(request: request, peer: peer, route: cached, firstLink: found.link, syncMeter: found.meter, keptRoute: true)
        }
        let route = try route(to: peer, remoteProtocol: found.own, deviceMemory: found.device || !region.hostAccessible, hint: hint)
        return Planned(request: request, peer: peer, route: route)
    }

    /// The router's order for one request, kept per peer (and per hint, buffer protocol and
    /// memory kind) until a transport is installed or removed, the peer's descriptor changes or a
    /// path fails. The common case (host memory, no protocol of its own, no hint) is looked up by
    /// `plan` without hashing.
    func route(to peer: Peer, remoteProtocol: String?, deviceMemory: Bool, hint: String?) throws -> RouteOrder {
        let hint = try checkedHint(hint)
        let plain = remoteProtocol == nil && !deviceMemory && hint == nil
        let key = RouteKey(hint: hint, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory)
        let now = MonotonicClock.nanoseconds()
        let routerGeneration = router.generation.load(ordering: .relaxed)
        if let cached = state.withLock({ state -> RouteOrder? in
            guard let route = plain ? peer.route : peer.otherRoutes[key], route.generation == state.routeGeneration,
                  route.routerGeneration == routerGeneration, now < route.validUntil else { return nil }
            return route.order
        }) {
            return cached
        }
        let (decision, generation) = routeDecisionAndGeneration(to: peer, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory,
                                                                hint: hint, now: now)
        let order = RouteOrder(decision.order.map(\.transport))
        guard !order.transports.isEmpty else {
            let reasons = decision.skipped.map { "\($0.protocolName): \($0.reason)" }.joined(separator: "; ")
            throw EngineError.segmentUnavailable(name: peer.name, reason: "no installed transport can reach this buffer (\(reasons))")
        }
        state.withLock { state in
            // Kept only if no transport was installed or removed since the decision's snapshot.
            guard state.routeGeneration == generation else { return }
            let kept = CachedRoute(generation: generation, routerGeneration: routerGeneration, validUntil: decision.validUntil, order: order,
                                   firstLink: peer.links[ObjectIdentifier(order.transports[0])])
            if plain { peer.route = kept } else if peer.otherRoutes.count < 64 { peer.otherRoutes[key] = kept }
        }
        return order
    }

    /// The full decision with reasons (also what `transfer-engine route` prints).
    func routeDecision(to peer: Peer, remoteProtocol: String?, deviceMemory: Bool, hint: String?,
                       now: UInt64 = MonotonicClock.nanoseconds()) -> Router.Decision {
        routeDecisionAndGeneration(to: peer, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory, hint: hint, now: now).0
    }

    /// The decision and the engine's route generation of the transports it was made from.
    private func routeDecisionAndGeneration(to peer: Peer, remoteProtocol: String?, deviceMemory: Bool, hint: String?,
                                            now: UInt64) -> (Router.Decision, UInt64) {
        let (installed, target, generation) = state.withLock { state in
            (state.transports, Router.Target(segment: peer.name, offered: peer.offered, sameHost: peer.sameHost, unreachable: peer.unreachable),
             state.routeGeneration)
        }
        return (router.decide(installed: installed, target: target, remoteProtocol: remoteProtocol, deviceMemory: deviceMemory,
                              hint: hint, now: now), generation)
    }

    /// Whether a peer reached at `host` runs on this host (shm goes first for it).
    func isSameHost(_ host: String) -> Bool {
        let localHost = (try? HostPort.parse(configuration.localHostname).host) ?? bindHost
        return host == bindHost || host == localHost || (Self.isLoopback(host) && (Self.isLoopback(bindHost) || Self.isLoopback(localHost)))
    }

    /// Whether `host` names this machine's loopback interface.
    static func isLoopback(_ host: String) -> Bool { host == "localhost" || host.hasPrefix("127.") || host == "::1" }

    /// Whether `host`, published for peers, cannot be used by an engine on another host: a
    /// loopback or unspecified address, or a name resolving only to such (Debian maps the host's
    /// own name to 127.0.1.1).
    static func unreachableFromOtherHosts(_ host: String) -> Bool {
        func local(_ address: String) -> Bool { isLoopback(address) || address == "0.0.0.0" || address == "::" }
        if local(host) { return true }
        guard let resolved = try? SocketAddress.resolve(host: host, port: 0), !resolved.isEmpty else { return false }
        return resolved.allSatisfy { local($0.host) }
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
        let first = state.withLock { state in state.warnedHints.count < 64 && state.warnedHints.insert(name).inserted }
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

    /// Where the requests of one (peer, order) go: the link of the first transport of the order
    /// that opened, how it takes requests, and the failover over the rest of the order.
    private struct Lane {
        var link: any TransportPeer
        /// Its transport (the metrics' label).
        var transport: any Transport
        /// The largest slice the transport takes (UInt64.max: whole requests).
        var piece: UInt64
        /// The failover over the transports after this one; nil when none is left.
        var failover: Failover?
        /// The slices for the link.
        var slices: [TransferSlice] = []
    }

    /// Dispatches already validated requests; `metered`: counted in the metrics as batched
    /// requests (a synchronous request counts itself).
    func submit(planned: [Planned], to batchID: BatchID, metered: Bool = true) throws {
        let batch = try self.batch(batchID)
        let longest = planned.reduce(UInt64(0)) { max($0, $1.request.length) }
        let deadline = MonotonicClock.nanoseconds() + (batch.timeoutNs ?? syncTimeout(bytes: longest))
        // Each request goes to the first transport of its order whose link opens. The requests
        // of a batch mostly share a peer and an order: they share a lane, found once.
        var lanes: [Lane] = []
        var laneOf = [Int](repeating: -1, count: planned.count)
        var failures: [Int: String] = [:]
        var sliceCounts = [Int](repeating: 0, count: planned.count)
        var last: (peer: ObjectIdentifier, route: ObjectIdentifier, lane: Int)?
        for i in planned.indices {
            let length = planned[i].request.length
            if length == 0 { continue }
            if planned[i].local { sliceCounts[i] = 1; continue }
            let peerID = ObjectIdentifier(planned[i].peer), routeID = ObjectIdentifier(planned[i].route)
            var lane = -1
            if let last, last.peer == peerID, last.route == routeID {
                lane = last.lane
            } else {
                let p = planned[i]
                var why: [String] = []
                for (index, transport) in p.order.enumerated() {
                    do {
                        let link = try link(to: p.peer, over: transport)
                        let rest = index + 1 < p.order.count ? Array(p.order[index...]) : []
                        lanes.append(Lane(link: link, transport: transport, piece: transport.splitsRequests ? UInt64.max : settings.splitSize,
                                          failover: rest.isEmpty ? nil : failover(batch: batch, order: rest, peer: p.peer, deadline: deadline)))
                        lane = lanes.count - 1
                        break
                    } catch { why.append("\(transport.protocolName): \(error)") }
                }
                if lane >= 0 { last = (peerID, routeID, lane) } else { failures[i] = why.joined(separator: "; ") }
            }
            laneOf[i] = lane
            sliceCounts[i] = lane < 0 ? 1 : Int((length - 1) / lanes[lane].piece + 1)
        }
        var meters: [RequestMeter?] = []
        if metered, let metrics {
            // The requests of a batch mostly share a lane and an operation: their meter is looked up once.
            var previous: (lane: Int, peer: ObjectIdentifier, operation: TransferRequest.Operation, local: Bool, meter: RequestMeter)?
            // Fields read in place: copying a Planned costs a retain of each of its references.
            meters = planned.indices.map { i in
                let peer = ObjectIdentifier(planned[i].peer), operation = planned[i].request.operation, local = planned[i].local
                if let previous, previous.lane == laneOf[i], previous.peer == peer, previous.operation == operation, previous.local == local {
                    return previous.meter
                }
                let meter = metrics.meter(peer: planned[i].peer, operation: operation, transport: laneOf[i] >= 0 ? lanes[laneOf[i]].transport : nil,
                                          local: local, batched: true)
                previous = (laneOf[i], peer, operation, local, meter)
                return meter
            }
        }
        let first = try batch.addTasks(sliceCounts: sliceCounts, deadline: deadline, meters: meters)
        for i in planned.indices where planned[i].request.length > 0 {
            let r = planned[i].request
            let task = first + i
            let lane = laneOf[i]
            guard lane >= 0 else {
                if planned[i].local {
                    let copied = registry.copyLocally(r)
                    batch.sliceFinished(task: task, bytes: copied ? r.length : 0,
                                        error: copied ? nil : "local copy of \(r.length) bytes: a range was unregistered meanwhile")
                } else {
                    batch.sliceFinished(task: task, bytes: 0, error: "\(r.operation) of \(r.length) bytes to \(planned[i].peer.name): no path opened (\(failures[i] ?? ""))")
                }
                continue
            }
            let token = lanes[lane].failover.map { $0.token(task: task) } ?? CompletionToken(batch: batch, task: task)
            let piece = lanes[lane].piece
            var offset: UInt64 = 0
            while offset < r.length {
                let size = min(piece, r.length - offset)
                lanes[lane].slices.append(TransferSlice(operation: r.operation, localAddress: r.localAddress + offset,
                                                        remoteAddress: r.remoteAddress + offset, length: size, token: token,
                                                        deadline: deadline))
                offset += size
            }
        }
        // Lanes on the same link (another order that starts with the same transport) go in one call each.
        var submitted: Set<ObjectIdentifier> = []
        for index in lanes.indices where !lanes[index].slices.isEmpty {
            let link = lanes[index].link
            guard submitted.insert(ObjectIdentifier(link)).inserted else { continue }
            var slices = lanes[index].slices
            for other in lanes.indices where other > index && lanes[other].link === link { slices += lanes[other].slices }
            link.submit(slices)
        }
    }

    /// The failover of one batched request over `order` (its first entry is where it starts).
    private func failover(batch: Batch, order: [any Transport], peer: Peer, deadline: UInt64) -> Failover {
        Failover(batch: batch, order: order, segment: peer.name, deadline: deadline, router: router, splitSize: settings.splitSize,
                 connector: { [weak self] transport in
                     guard let self else { throw EngineError.invalidArgument("the engine shut down") }
                     return try self.link(to: peer, over: transport)
                 },
                 onFailover: { [logger, metrics, cooldown = settings.pathCooldownMs, name = peer.name] from, to, reason in
                     metrics?.failover(from: from, to: to)
                     logger.warning("\(Self.failoverLine(from: from, to: to, segment: name, reason: reason, cooldownMs: cooldown))", metadata: ["peer": "\(name)"])
                 })
    }

    /// The one warning a path's first failure gives (batched and synchronous requests alike).
    static func failoverLine(from: String, to: String, segment: String, reason: String, cooldownMs: Int) -> String {
        "\(from) path to \(segment) failed (\(reason)); failing over to \(to), \(from) tried last for \(cooldownMs) ms"
    }
}
