/// Opened peer segments: their descriptors, their links over each transport, and the route
/// cached for their plain host-memory buffers.
extension TransferEngine {
    /// A peer segment this engine has opened. Its mutable fields change only under the
    /// engine's state lock, which makes each access exclusive: they opt out of the runtime
    /// exclusivity checks that every transfer would pay.
    final class Peer: @unchecked Sendable {
        let name: String
        let host: String
        let rpcPort: UInt16
        @exclusivity(unchecked) var descriptor: SegmentDescriptor {
            didSet { offered = descriptor.offeredProtocols }
        }
        /// The protocols its descriptor offers (kept: routing asks for every new route).
        @exclusivity(unchecked) private(set) var offered: Set<String>
        /// Whether it runs on this host.
        let sameHost: Bool
        /// Links opened so far, per transport (keyed by the transport object: no string hashing per request).
        @exclusivity(unchecked) var links: [ObjectIdentifier: any TransportPeer] = [:]
        /// Transports that cannot reach this peer (connect failed, e.g. shm to another host), with why.
        @exclusivity(unchecked) var unreachable: [String: String] = [:]
        /// The order for buffers with no protocol of their own, in host memory, without a hint.
        @exclusivity(unchecked) var route: CachedRoute?
        /// The orders for the other cases (a hint, a buffer protocol, device memory), at most 64.
        @exclusivity(unchecked) var otherRoutes: [RouteKey: CachedRoute] = [:]
        /// Meters of synchronous requests to it, by first transport and operation (at most 16),
        /// handed out with its cached route: a synchronous request finds its meter without
        /// hashing. The transport is held, so its identity (`id`, compared in place: no retain) cannot be reused.
        @exclusivity(unchecked) var syncMeters: [(transport: any Transport, id: ObjectIdentifier, operation: TransferRequest.Operation, meter: RequestMeter)] = []

        init(name: String, host: String, rpcPort: UInt16, descriptor: SegmentDescriptor, sameHost: Bool) {
            self.name = name
            self.host = host
            self.rpcPort = rpcPort
            self.descriptor = descriptor
            self.offered = descriptor.offeredProtocols
            self.sameHost = sameHost
        }

        /// Drops every kept route (call under the engine's state lock).
        func forgetRoutes() {
            route = nil
            otherRoutes.removeAll()
        }
    }

    /// What a kept route other than the common one depends on.
    struct RouteKey: Hashable {
        var hint: String?
        var remoteProtocol: String?
        var deviceMemory: Bool
    }

    /// A route decision kept while nothing it depends on changed.
    struct CachedRoute {
        /// The engine's and the router's generations it was decided at.
        var generation: UInt64
        var routerGeneration: UInt64
        var validUntil: UInt64
        var order: RouteOrder
        /// The link over the order's first transport, when it was open when the route was kept.
        var firstLink: (any TransportPeer)?
    }

    /// Opens a peer segment by name (P2P: `host:rpc_port`), fetching its descriptor.
    /// Opening this engine's own name returns the local segment handle 0.
    public func openSegment(_ name: String) throws -> SegmentHandle {
        if name == segmentName { return 0 }
        if let handle = state.withLock({ $0.handles[name] }) {
            if settings.disableMetacache { try refreshSegment(handle) }
            return handle
        }
        let location = try locate(name)
        let peer = Peer(name: name, host: location.host, rpcPort: location.port, descriptor: location.descriptor,
                        sameHost: isSameHost(location.host))
        return state.withLock { state in
            if let existing = state.handles[name] { return existing }
            let handle = state.nextHandle
            state.nextHandle += 1
            state.peers[handle] = peer
            state.handles[name] = handle
            return handle
        }
    }

    /// Forgets an opened segment and closes its links.
    public func closeSegment(_ handle: SegmentHandle) throws {
        guard handle != 0 else { return }
        guard let peer = state.withLock({ state -> Peer? in
            guard let peer = state.peers.removeValue(forKey: handle) else { return nil }
            state.handles.removeValue(forKey: peer.name)
            return peer
        }) else { throw EngineError.invalidArgument("unknown segment handle \(handle)") }
        let links = state.withLock { _ in peer.links.values }
        for link in links { link.close() }
        // After the links closed, so the requests on them have ended and been counted.
        metrics?.forgetMeters(of: peer)
    }

    /// The descriptor of an opened segment (cached).
    public func descriptor(of handle: SegmentHandle) throws -> SegmentDescriptor {
        if handle == 0 { return localDescriptor }
        return try peer(handle).descriptor
    }

    /// Re-fetches an opened segment's descriptor (after the peer registered more memory or
    /// restarted). Links are kept while the peer's ports, transport fields and buffers are
    /// unchanged. A restarted peer (ports or transport fields changed) has every link closed and
    /// reopened on next use; a peer whose buffers changed has its plugin links reopened, since a
    /// plugin keeps per-buffer state from the descriptor it opened with (rkeys, access slots),
    /// while its TCP link, which looks buffers up per request, stays.
    public func refreshSegment(_ handle: SegmentHandle) throws {
        guard handle != 0 else { return }
        let peer = try peer(handle)
        let fresh = try locate(peer.name).descriptor
        let stale: [any TransportPeer] = state.withLock { _ in
            let restarted = fresh.tcpDataPort != peer.descriptor.tcpDataPort || fresh.extra != peer.descriptor.extra
            let buffersChanged = fresh.buffers != peer.descriptor.buffers
            peer.descriptor = fresh
            peer.forgetRoutes()
            if restarted {
                defer { peer.links.removeAll(); peer.unreachable.removeAll() }
                return Array(peer.links.values)
            }
            guard buffersChanged else { return [] }
            let plugin = peer.links.filter { $0.value is PluginPeer }
            for key in plugin.keys { peer.links.removeValue(forKey: key) }
            return Array(plugin.values)
        }
        for link in stale { link.close() }
    }

    /// Re-fetches the descriptor of every opened segment (Mooncake's syncSegmentCache).
    /// Every segment is attempted; the first failure is rethrown at the end.
    public func refreshAllSegments() throws {
        let handles = state.withLock { Array($0.peers.keys.filter { $0 != 0 }) }
        var firstError: Error?
        for handle in handles {
            do { try refreshSegment(handle) } catch { if firstError == nil { firstError = error } }
        }
        if let firstError { throw firstError }
    }

    func peer(_ handle: SegmentHandle) throws -> Peer {
        if handle == 0 {
            // Built before taking `state` (localDescriptor takes that lock itself), from the
            // registrations of `generation` or later; a slower thread's older build never
            // replaces a newer one.
            let generation = state.withLock { $0.registrationGeneration }
            let descriptor = localDescriptor
            let found = state.withLock { state -> Peer? in
                if state.stopped { return nil }
                guard let peer = state.peers[0] else {
                    let peer = Peer(name: segmentName, host: bindHost, rpcPort: rpcPort, descriptor: descriptor, sameHost: true)
                    state.peers[0] = peer
                    state.selfDescriptorGeneration = generation
                    return peer
                }
                if generation >= state.selfDescriptorGeneration {
                    peer.descriptor = descriptor
                    if generation > state.selfDescriptorGeneration { peer.forgetRoutes() }
                    state.selfDescriptorGeneration = generation
                }
                return peer
            }
            guard let found else { throw EngineError.invalidArgument("the engine is shut down") }
            return found
        }
        let (found, stopped) = state.withLock { ($0.peers[handle], $0.stopped) }
        // After shutdown nothing moves, a copy within this process included.
        if stopped { throw EngineError.invalidArgument("the engine is shut down") }
        guard let found else {
            throw EngineError.invalidArgument("unknown segment handle \(handle); open the segment first")
        }
        return found
    }

    /// The link to `peer` over `transport`, opened on first use. A transport that cannot reach
    /// the peer is remembered as unreachable for it (until the segment is refreshed or reopened).
    func link(to peer: Peer, over transport: any Transport) throws -> any TransportPeer {
        let key = ObjectIdentifier(transport)
        if let known = state.withLock({ _ in peer.links[key] }) { return known }
        let name = transport.protocolName
        func installed(_ state: State) -> Bool { !state.stopped && state.transports.contains { $0 === transport } }
        let (unreachable, view, live) = state.withLock { state in (peer.unreachable[name], peer.descriptor, installed(state)) }
        guard live else { throw EngineError.segmentUnavailable(name: peer.name, reason: "\(name) is no longer installed") }
        if let unreachable { throw EngineError.segmentUnavailable(name: peer.name, reason: "\(name): \(unreachable)") }
        let host = peer.name == segmentName ? bindHost : peer.host
        do {
            let opened = try transport.connect(segment: peer.name, view: view.view(for: name), host: host)
            // Kept only while the transport is still installed (it may be removed meanwhile).
            let (kept, extra) = state.withLock { state -> ((any TransportPeer)?, (any TransportPeer)?) in
                guard installed(state) else { return (nil, opened) }
                if let raced = peer.links[key] { return (raced, opened) }
                peer.links[key] = opened
                peer.forgetRoutes()  // kept again with this link
                return (opened, nil)
            }
            extra?.close()
            guard let kept else { throw EngineError.segmentUnavailable(name: peer.name, reason: "\(name) was removed while connecting") }
            if kept === opened { metrics?.connection(transport: name, opened: true) }
            return kept
        } catch {
            metrics?.connection(transport: name, opened: false)
            let marked = state.withLock { state -> Bool in
                guard installed(state) else { return false }
                peer.unreachable[name] = "\(error)"
                peer.forgetRoutes()
                return true
            }
            guard marked else { throw error }
            let others = activeProtocols.filter { $0 != name }.joined(separator: "/")
            logger.info("\(name) cannot reach \(peer.name), using \(others) for it: \(error)", metadata: ["peer": "\(peer.name)"])
            throw error
        }
    }

    /// The handshake address of a segment named by a plugin: this engine's own listener, an
    /// opened peer's known address, else a lookup (P2P name or the metadata server's rpc_meta).
    func handshakeAddress(of name: String) throws -> (host: String, port: UInt16) {
        if name == segmentName { return (bindHost, rpcPort) }
        let known: (host: String, port: UInt16)? = state.withLock { state in
            guard let handle = state.handles[name], let peer = state.peers[handle] else { return nil }
            return (peer.host, peer.rpcPort)
        }
        return try known ?? handshakeAddresses.resolve(name)
    }
}
