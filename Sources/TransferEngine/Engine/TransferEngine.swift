import FoundationEssentials
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The transfer engine: owns local memory registrations, the handshake and
/// TCP data listeners, opened peer segments, batches, and the active
/// transport plugin (when one was selected and is available).
///
/// Typical use (Mooncake's flow):
/// ```swift
/// let engine = try TransferEngine(configuration: config)
/// try engine.registerMemory(address: base, length: size)
/// let peer = try engine.openSegment("10.0.0.2:15123")
/// try engine.transferSync(.write, localAddress: base, segment: peer, remoteAddress: remoteBase, length: 4096)
/// ```
public final class TransferEngine: @unchecked Sendable {
    /// The resolved configuration.
    public let configuration: EngineConfiguration
    /// This engine's segment name (`host:rpc_port` in P2P mode).
    public let segmentName: String
    /// The handshake (RPC) port.
    public let rpcPort: UInt16
    /// The TCP data port.
    public let dataPort: UInt16
    /// The protocol selection (effective protocol, fallback reason).
    public let selection: ProtocolSelector.Selection
    /// Set when peers must prove the shared secret (MC_AUTH_SECRET); nil: authentication off.
    let authenticator: PeerAuthenticator?

    let logger: Logger
    let registry = MemoryRegistry()
    private let metadataStore: MetadataStore?
    private let keys: MetadataKeys
    /// Where a named segment's handshake port is (P2P name or the metadata server's rpc_meta).
    private let handshakeAddresses: HandshakeAddressResolver
    let settings: Settings
    private let bindHost: String
    private let dataServer: TCPDataServer
    private var handshakeServer: HandshakeServer?
    private var plugin: PluginTransport?
    private let state: ConditionLock<State>

    /// Tunables read from the environment (upstream's MC_* names where they exist).
    struct Settings: Sendable {
        /// Upstream uses 4; on a 2-core host 2 lanes measured faster (fewer threads contending).
        var lanesPerPeer = min(4, max(2, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        var splitSize: UInt64 = 1 << 20
        var connectTimeoutMs = 5000
        var statusTimeoutMs = 30_000
        var handshakeReplyMs = 60_000
        var handshakeMaxLength = HandshakeWire.defaultMaxLength
        var transferTimeoutNs: UInt64 = 30_000_000_000
        var useV2Client = true
        var portRange: ClosedRange<UInt16> = 15000...17000
        var serverSpinNs: UInt64 = 50_000
        /// The data port closes a connection idle this long (MC_TCP_IDLE_TIMEOUT_SEC).
        var dataIdleTimeoutMs = 300_000
        /// Data connections at once from one address (MC_TCP_MAX_CONNECTIONS_PER_ADDRESS).
        var dataMaxPerAddress = 256
        /// How long a synchronous plugin transfer busy-polls the plugin before it waits (MC_PLUGIN_SYNC_SPIN_US).
        var pluginSyncSpinNs: UInt64 = 50_000
        var metadataTimeoutMs = 5000
        var metadataTTLSeconds = 30
        /// Notifications held until taken (MC_NOTIFY_MAX_COUNT / MC_NOTIFY_MAX_BYTES); the oldest go first.
        var notifyMaxCount = 4096
        var notifyMaxBytes = 64 << 20
        /// What handshake-port peers can hold (MC_HANDSHAKE_FRAME_TIMEOUT_MS, _MAX_CONNECTIONS, _MAX_PER_ADDRESS).
        var handshakeLimits = HandshakeServer.Limits()

        init(environment: [String: String]) throws {
            func integer(_ names: [String], _ range: ClosedRange<Int>) throws -> Int? {
                for name in names {
                    guard let text = environment[name], !text.isEmpty else { continue }
                    guard let value = Int(text), range.contains(value) else {
                        throw EngineError.invalidConfiguration("\(name)='\(text)' must be an integer in \(range.lowerBound)...\(range.upperBound)")
                    }
                    return value
                }
                return nil
            }
            if let v = try integer(["MC_TCP_LANES_PER_PEER", "MC_TCP_MAX_CONNECTIONS_PER_PEER"], 1...64) { lanesPerPeer = v }
            if let text = environment["MC_TCP_SPLIT_SIZE"], !text.isEmpty {
                splitSize = max(4096, try ByteSize.parse(text))
            }
            if let v = try integer(["MC_HANDSHAKE_CONNECT_TIMEOUT"], 1...3600) { connectTimeoutMs = v * 1000 }
            if let v = try integer(["MC_TCP_STATUS_TIMEOUT_SEC"], 1...3600) { statusTimeoutMs = v * 1000 }
            if let v = try integer(["MC_HANDSHAKE_MAX_LENGTH"], 1...(128 << 20)) { handshakeMaxLength = v }
            if let v = try integer(["MC_TRANSFER_TIMEOUT"], 1...86_400) { transferTimeoutNs = UInt64(max(5, v)) * 1_000_000_000 }
            useV2Client = environment["MC_TCP_PROTO"] != "1"
            if let v = try integer(["MC_TCP_SERVER_SPIN_US"], 0...10_000) { serverSpinNs = UInt64(v) * 1000 }
            if let v = try integer(["MC_TCP_IDLE_TIMEOUT_SEC"], 1...86_400) { dataIdleTimeoutMs = v * 1000 }
            if let v = try integer(["MC_TCP_MAX_CONNECTIONS_PER_ADDRESS"], 1...TCPDataServer.maxConnections) { dataMaxPerAddress = v }
            if let v = try integer(["MC_PLUGIN_SYNC_SPIN_US"], 0...10_000) { pluginSyncSpinNs = UInt64(v) * 1000 }
            if let v = try integer(["MC_METADATA_TIMEOUT_MS"], 100...600_000) { metadataTimeoutMs = v }
            if let v = try integer(["MC_METADATA_TTL_SECONDS"], 2...86_400) { metadataTTLSeconds = v }
            if let v = try integer(["MC_HANDSHAKE_FRAME_TIMEOUT_MS"], 100...600_000) { handshakeLimits.frameDeadlineMs = v }
            if let v = try integer(["MC_HANDSHAKE_MAX_CONNECTIONS"], 1...65_536) { handshakeLimits.maxConnections = v }
            if let v = try integer(["MC_HANDSHAKE_MAX_PER_ADDRESS"], 1...65_536) { handshakeLimits.maxPerAddress = v }
            if let v = try integer(["MC_NOTIFY_MAX_COUNT"], 1...1_000_000) { notifyMaxCount = v }
            if let v = try integer(["MC_NOTIFY_MAX_BYTES"], 1024...(1 << 34)) { notifyMaxBytes = v }
            let low = try integer(["MC_MIN_RPC_PORT", "MC_MIN_PRC_PORT"], 1...65535) ?? 15000
            let high = try integer(["MC_MAX_RPC_PORT", "MC_MAX_PRC_PORT"], 1...65535) ?? 17000
            guard low <= high else { throw EngineError.invalidConfiguration("MC_MIN_RPC_PORT \(low) is above MC_MAX_RPC_PORT \(high)") }
            portRange = UInt16(low)...UInt16(high)
        }
    }

    /// A peer segment this engine has opened. Its mutable fields change only under the
    /// engine's state lock, which makes each access exclusive: they opt out of the runtime
    /// exclusivity checks that every transfer would pay.
    final class Peer: @unchecked Sendable {
        let name: String
        let host: String
        let rpcPort: UInt16
        @exclusivity(unchecked) var descriptor: SegmentDescriptor
        @exclusivity(unchecked) var channel: TCPChannel?
        @exclusivity(unchecked) var pluginPeer: UInt64?
        /// Set when the plugin cannot reach this peer (e.g. shm and a peer on another host): use TCP.
        @exclusivity(unchecked) var pluginUnreachable = false

        init(name: String, host: String, rpcPort: UInt16, descriptor: SegmentDescriptor) {
            self.name = name
            self.host = host
            self.rpcPort = rpcPort
            self.descriptor = descriptor
        }
    }

    private struct State {
        var peers: [SegmentHandle: Peer] = [:]
        var handles: [String: SegmentHandle] = [:]
        var nextHandle: SegmentHandle = 1
        var batches: [BatchID: Batch] = [:]
        var nextBatch: BatchID = 1
        var notifications: NotificationQueue
        var managed: [UInt64: (length: UInt64, fromPlugin: Bool)] = [:]
        var bufferFragments: [UInt64: [String: JSONValue]] = [:]
        var stopped = false
        /// Bumped by every registration change: the own segment's cached descriptor is replaced
        /// only by one built at the same or a later generation (two threads may rebuild it at once).
        var registrationGeneration: UInt64 = 0
        var selfDescriptorGeneration: UInt64 = 0
    }

    /// Starts an engine: validates the configuration, binds the handshake and
    /// data listeners, selects the transport (falling back to TCP with one
    /// warning when the requested plugin is missing or reports hardware absent).
    public init(configuration: EngineConfiguration, environment: [String: String] = ProcessInfo.processInfo.environment,
                logger: Logger = Logger(label: "transfer-engine")) throws {
        self.configuration = configuration
        self.logger = logger
        self.settings = try Settings(environment: environment)
        state = ConditionLock(State(notifications: NotificationQueue(maxCount: settings.notifyMaxCount, maxBytes: settings.notifyMaxBytes)))
        authenticator = try PeerAuthenticator.secret(environment: environment, configured: configuration.authSecret).map(PeerAuthenticator.init(secret:))

        keys = MetadataKeys(environment: environment)
        switch try MetadataServer.parse(configuration.metadataServer) {
        case .p2pHandshake: metadataStore = nil
        case .http(let url):
            metadataStore = try HTTPMetadataStore(url: url, timeoutMs: settings.metadataTimeoutMs,
                                                  token: environment["MC_METADATA_TOKEN"].flatMap { $0.isEmpty ? nil : $0 })
        case .redis(let address):
            metadataStore = try RedisMetadataStore(address: address, environment: environment, timeoutMs: settings.metadataTimeoutMs)
        case .etcd(let endpoints):
            metadataStore = try EtcdMetadataStore(endpoints: endpoints, timeoutMs: settings.metadataTimeoutMs,
                                                  credentials: try EtcdMetadataStore.credentials(environment: environment))
        }
        handshakeAddresses = HandshakeAddressResolver(store: metadataStore, keys: keys, budgetMs: settings.metadataTimeoutMs)

        let local = try HostPort.parse(configuration.localHostname)
        if let bind = environment["MC_TCP_BIND_ADDRESS"], !bind.isEmpty { bindHost = bind } else { bindHost = local.host }

        let catalog = PluginCatalog(environment: environment)
        selection = try ProtocolSelector.select(requested: configuration.protocolName, catalog: catalog, environment: environment) {
            Self.pluginOptions(configuration: configuration, segmentName: "", environment: environment, protocolName: $0)
        }
        if let warning = selection.warningLine { logger.warning("\(warning)") }
        if let notice = selection.notice { logger.info("\(notice)") }

        // P2P: a port written in local_hostname is used when free (upstream always picks one at
        // random); the name peers use is host:rpc_port either way, and get_rpc_port reports it.
        let (handshakeListener, portTaken) = try PortAllocator.listen(host: bindHost, preferred: metadataStore == nil ? local.port : nil,
                                                                      range: settings.portRange)
        if let portTaken, let port = local.port {
            logger.info("handshake port \(port) from local_hostname is not free (\(portTaken)); using \(handshakeListener.localAddress.port)")
        }
        let dataListener = try PortAllocator.listen(host: bindHost, range: settings.portRange)
        rpcPort = handshakeListener.localAddress.port
        // P2P: the segment name is host:rpc_port. With a metadata server it is local_hostname as given.
        segmentName = metadataStore == nil ? HostPort(host: local.host, port: rpcPort).description : configuration.localHostname
        dataServer = try TCPDataServer(listener: dataListener, registry: registry, logger: logger, payloadTimeoutMs: settings.statusTimeoutMs,
                                      spinNanoseconds: settings.serverSpinNs, idleTimeoutMs: settings.dataIdleTimeoutMs,
                                      maxPerAddress: settings.dataMaxPerAddress, auth: authenticator)
        dataPort = dataServer.port

        if let loaded = selection.plugin {
            let options = Self.pluginOptions(configuration: configuration, segmentName: segmentName, environment: environment,
                                             protocolName: selection.effective, peerAuthentication: authenticator != nil)
            let handshakeTimeouts = HandshakeClient.Timeouts(connectMs: settings.connectTimeoutMs, replyMs: settings.handshakeReplyMs, auth: authenticator)
            let maxLength = settings.handshakeMaxLength
            plugin = try PluginTransport(plugin: loaded, protocolName: selection.effective, optionsJSON: options, logger: logger) { [weak self] peer, request in
                guard let self else { throw EngineError.invalidArgument("the engine is shutting down") }
                let target = try self.handshakeAddress(of: peer)
                return try HandshakeClient.exchange(host: target.host, port: target.port, message: .init(kind: .connection, json: request),
                                                    timeouts: handshakeTimeouts, maxLength: maxLength).json
            }
        }
        handshakeServer = try HandshakeServer(listener: handshakeListener, maxLength: settings.handshakeMaxLength, limits: settings.handshakeLimits,
                                              auth: authenticator, logger: logger) { [weak self] message in
            self?.answerHandshake(message)
        }
        if let store = metadataStore {
            do {
                try publish(store)
            } catch {
                shutdown()
                throw EngineError.invalidMetadataServer("\(error)")
            }
            let interval = UInt64(max(1, settings.metadataTTLSeconds / 3)) * 1_000_000_000
            try OSThread.spawn(name: "te-meta-keep") { [weak self] in
                // Re-publishing refreshes the TTL and restores our keys after a server restart.
                while let engine = self, !engine.state.wait(deadline: MonotonicClock.nanoseconds() + interval, until: { $0.stopped ? true : nil }).map({ $0 }).isTrue {
                    do { try engine.publish(store) } catch { engine.logger.warning("metadata refresh failed (will retry): \(error)") }
                }
            }
        }
        let authNote = authenticator != nil ? ", peers must authenticate (shared secret)" : ""
        logger.info("engine ready: segment \(segmentName), protocol \(selection.effective), data port \(dataPort), bound to \(bindHost)\(authNote)")
    }

    /// The handshake address of a segment named by a plugin: this engine's own listener, an
    /// opened peer's known address, else a lookup (P2P name or the metadata server's rpc_meta).
    private func handshakeAddress(of name: String) throws -> (host: String, port: UInt16) {
        if name == segmentName { return (bindHost, rpcPort) }
        let known: (host: String, port: UInt16)? = state.withLock { state in
            guard let handle = state.handles[name], let peer = state.peers[handle] else { return nil }
            return (peer.host, peer.rpcPort)
        }
        return try known ?? handshakeAddresses.resolve(name)
    }

    /// Writes our rpc_meta entry and segment descriptor to the metadata server (with retries).
    private func publish(_ store: MetadataStore) throws {
        let ttl = store is HTTPMetadataStore ? nil : settings.metadataTTLSeconds
        let rpcMeta = JSONValue.object(["ip_or_host_name": .string(bindHost), "rpc_port": .uint(UInt64(rpcPort))]).compactText
        try withRetries(budgetMs: settings.metadataTimeoutMs) {
            if let etcd = store as? EtcdMetadataStore { try etcd.refreshLease(ttlSeconds: settings.metadataTTLSeconds) }
            try store.put(keys.rpcMeta(segmentName), rpcMeta, ttlSeconds: ttl)
            try store.put(keys.segment(segmentName), localDescriptor.json.compactText, ttlSeconds: ttl)
        }
    }

    /// Re-publishes the descriptor after a registration change (metadata-server mode).
    private func republishDescriptor() throws {
        guard let store = metadataStore else { return }
        let ttl = store is HTTPMetadataStore ? nil : settings.metadataTTLSeconds
        let key = keys.segment(segmentName)
        try withRetries(budgetMs: settings.metadataTimeoutMs) {
            try store.put(key, localDescriptor.json.compactText, ttlSeconds: ttl)
        }
    }

    /// Where a named segment is and what it holds: over the handshake port (P2P) or from the metadata server.
    private func locate(_ name: String) throws -> (host: String, port: UInt16, descriptor: SegmentDescriptor) {
        guard let store = metadataStore else {
            let target = try handshakeAddresses.resolve(name)
            return (target.host, target.port, try fetchDescriptor(host: target.host, port: target.port, name: name))
        }
        do {
            return try withRetries(budgetMs: settings.metadataTimeoutMs) {
                guard let rpcText = try store.get(keys.rpcMeta(name)) else {
                    throw MetadataRejection(description: "no key '\(keys.rpcMeta(name))' on \(store.serverDescription)")
                }
                guard let descriptorText = try store.get(keys.segment(name)) else {
                    throw MetadataRejection(description: "no key '\(keys.segment(name))' on \(store.serverDescription)")
                }
                let rpc = try HandshakeAddressResolver.decodeRPCMeta(rpcText, segment: name)
                return (rpc.host, rpc.port, try SegmentDescriptor.decode(try JSONValue.parse(descriptorText)))
            }
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "\(error)")
        }
    }

    /// Stops the listeners and lanes. Registered memory stays the caller's.
    public func shutdown() {
        let peers: [Peer] = state.withLock(notify: true) { state in
            if state.stopped { return [] }
            state.stopped = true
            return Array(state.peers.values)
        }
        handshakeServer?.stop()
        dataServer.stop()
        peers.forEach { $0.channel?.close() }
        plugin?.shutdown()
        if let store = metadataStore {
            // A clean shutdown removes our keys (a crash leaves them to their TTL).
            for key in [keys.segment(segmentName), keys.rpcMeta(segmentName)] {
                do { try store.delete(key) } catch { logger.warning("could not delete \(key): \(error)") }
            }
        }
    }

    deinit { shutdown() }

    /// The options JSON a plugin gets at probe and create.
    /// `protocol` is the protocol the plugin is loaded for (one plugin file may serve several).
    /// `peerAuthentication`: peers must pass the shared-secret exchange before any of their
    /// handshakes reach the plugin (passed on as `peer_authentication`).
    /// Secrets (MC_AUTH_SECRET, passwords, tokens) are not passed on: plugins have no use for them.
    public static func pluginOptions(configuration: EngineConfiguration, segmentName: String, environment: [String: String],
                                     protocolName: String? = nil, peerAuthentication: Bool = false) -> String {
        let secrets: Set<String> = ["MC_AUTH_SECRET", "MC_AUTH_SECRET_FILE", "MC_METADATA_TOKEN", "MC_ETCD_PASSWORD", "MC_REDIS_PASSWORD"]
        var options: [String: JSONValue] = [:]
        for (key, value) in environment where key.hasPrefix("MC_") && !secrets.contains(key) { options[key] = .string(value) }
        return JSONValue.object([
            "protocol": .string(protocolName ?? configuration.protocolName.lowercased()),
            "device_name": .string(configuration.deviceName),
            "local_hostname": .string(configuration.localHostname),
            "segment_name": .string(segmentName),
            "peer_authentication": .bool(peerAuthentication),
            "options": .object(options),
        ]).compactText
    }

    /// The protocol that is running (`tcp` after a fallback).
    public var activeProtocol: String { selection.effective }

    // MARK: - Memory

    /// Registers [address, address+length) so peers may read and write it.
    /// `location` is Mooncake's memory location ("cpu:0", "cuda:1", "*").
    public func registerMemory(address: UInt64, length: UInt64, location: String = "*") throws {
        try registry.register(address: address, length: length, location: location)
        state.withLock { $0.registrationGeneration += 1 }
        do {
            if let plugin {
                let fragment = try plugin.register(address: address, length: length, location: location)
                state.withLock { $0.bufferFragments[address] = fragment }
            }
            try republishDescriptor()
        } catch {
            // Lose nothing: a registration peers cannot see is rolled back.
            _ = try? registry.unregister(address: address)
            state.withLock { _ = $0.bufferFragments.removeValue(forKey: address) }
            try? plugin?.unregister(address: address)
            throw error
        }
    }

    /// Unregisters the buffer starting at `address`; returns after in-flight peer access to it ended.
    public func unregisterMemory(address: UInt64) throws {
        try registry.unregister(address: address)
        state.withLock { state in
            state.registrationGeneration += 1
            _ = state.bufferFragments.removeValue(forKey: address)
        }
        try plugin?.unregister(address: address)
        do { try republishDescriptor() } catch {
            logger.warning("unregistered 0x\(String(address, radix: 16)) locally; publishing the descriptor failed (retried by the refresh): \(error)")
        }
    }

    /// Allocates page-aligned memory and registers it; free it with `freeManagedBuffer`.
    public func allocateManagedBuffer(length: UInt64, location: String = "cpu:0") throws -> UInt64 {
        guard length > 0, length < UInt64(Int.max) else { throw EngineError.invalidArgument("managed buffer length \(length)") }
        // A transport with memory of its own (a CXL pool) provides it; otherwise page-aligned heap memory.
        let address: UInt64
        let fromPlugin: Bool
        if let provided = try plugin?.allocate(length: length, location: location) {
            (address, fromPlugin) = (provided, true)
        } else if !MemoryLocation.isHostAccessible(location) {
            throw EngineError.invalidArgument("managed buffers at \(location) need a transport that allocates device memory "
                + "(nvlink, nvlink_intra, hip, rdma for cuda:N); protocol \(activeProtocol) does not. Allocate the memory with the device's "
                + "runtime and register it with location \(location) instead")
        } else {
            var pointer: UnsafeMutableRawPointer?
            let rc = posix_memalign(&pointer, 4096, Int(length))
            guard rc == 0, let pointer else { throw EngineError.system(call: "posix_memalign(\(length))", errno: rc) }
            (address, fromPlugin) = (UInt64(UInt(bitPattern: pointer)), false)
        }
        do { try registerMemory(address: address, length: length, location: location) } catch {
            try? releaseManaged(address: address, fromPlugin: fromPlugin)
            throw error
        }
        state.withLock { $0.managed[address] = (length, fromPlugin) }
        return address
    }

    /// Returns managed memory to where it came from (the plugin or the heap).
    private func releaseManaged(address: UInt64, fromPlugin: Bool) throws {
        if fromPlugin { try plugin?.free(address: address) } else { free(UnsafeMutableRawPointer(bitPattern: UInt(address))) }
    }

    /// Unregisters and frees a managed buffer.
    public func freeManagedBuffer(address: UInt64) throws {
        guard let managed = state.withLock({ $0.managed.removeValue(forKey: address) }) else {
            throw EngineError.invalidArgument("0x\(String(address, radix: 16)) is not a managed buffer")
        }
        try? unregisterMemory(address: address)
        try releaseManaged(address: address, fromPlugin: managed.fromPlugin)
    }

    /// The descriptor this engine publishes.
    public var localDescriptor: SegmentDescriptor {
        let fragments = state.withLock { $0.bufferFragments }
        let usePlugin = plugin != nil
        let buffers = registry.all.map { region in
            SegmentDescriptor.Buffer(name: usePlugin ? region.location : segmentName, address: region.address,
                                     length: region.length, extra: fragments[region.address] ?? [:])
        }
        var extra = (try? plugin?.localDescriptorFragment()) ?? [:]
        // Ranges the plugin itself serves (e.g. NVMe namespaces) are listed after the registered memory;
        // an entry peers would refuse (and with it the whole descriptor) is left out.
        let served = (extra.removeValue(forKey: "buffers")?.arrayValue ?? []).enumerated().compactMap {
            try? SegmentDescriptor.Buffer.decode($1, index: $0)
        }
        return SegmentDescriptor(name: segmentName, protocolName: selection.effective, tcpDataPort: dataPort,
                                 buffers: buffers + served, extra: extra)
    }

    // MARK: - Segments

    /// Opens a peer segment by name (P2P: `host:rpc_port`), fetching its descriptor.
    /// Opening this engine's own name returns the local segment handle 0.
    public func openSegment(_ name: String) throws -> SegmentHandle {
        if name == segmentName { return 0 }
        if let handle = state.withLock({ $0.handles[name] }) { return handle }
        let location = try locate(name)
        let peer = Peer(name: name, host: location.host, rpcPort: location.port, descriptor: location.descriptor)
        return state.withLock { state in
            if let existing = state.handles[name] { return existing }
            let handle = state.nextHandle
            state.nextHandle += 1
            state.peers[handle] = peer
            state.handles[name] = handle
            return handle
        }
    }

    /// Forgets an opened segment and closes its connections.
    public func closeSegment(_ handle: SegmentHandle) throws {
        guard handle != 0 else { return }
        guard let peer = state.withLock({ state -> Peer? in
            guard let peer = state.peers.removeValue(forKey: handle) else { return nil }
            state.handles.removeValue(forKey: peer.name)
            return peer
        }) else { throw EngineError.invalidArgument("unknown segment handle \(handle)") }
        peer.channel?.close()
        if let pluginPeer = peer.pluginPeer { plugin?.closePeer(pluginPeer) }
    }

    /// The descriptor of an opened segment (cached).
    public func descriptor(of handle: SegmentHandle) throws -> SegmentDescriptor {
        if handle == 0 { return localDescriptor }
        return try peer(handle).descriptor
    }

    /// Re-fetches an opened segment's descriptor (after the peer registered more memory).
    public func refreshSegment(_ handle: SegmentHandle) throws {
        guard handle != 0 else { return }
        let peer = try peer(handle)
        let fresh = try locate(peer.name).descriptor
        state.withLock { _ in peer.descriptor = fresh }
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

    private func peer(_ handle: SegmentHandle) throws -> Peer {
        if handle == 0 {
            // Built before taking `state` (localDescriptor takes that lock itself), from the
            // registrations of `generation` or later; a slower thread's older build never
            // replaces a newer one.
            let generation = state.withLock { $0.registrationGeneration }
            let descriptor = localDescriptor
            return state.withLock { state in
                guard let peer = state.peers[0] else {
                    let peer = Peer(name: segmentName, host: bindHost, rpcPort: rpcPort, descriptor: descriptor)
                    state.peers[0] = peer
                    state.selfDescriptorGeneration = generation
                    return peer
                }
                if generation >= state.selfDescriptorGeneration {
                    peer.descriptor = descriptor
                    state.selfDescriptorGeneration = generation
                }
                return peer
            }
        }
        guard let peer = state.withLock({ $0.peers[handle] }) else {
            throw EngineError.invalidArgument("unknown segment handle \(handle); open the segment first")
        }
        return peer
    }

    private var handshakeTimeouts: HandshakeClient.Timeouts {
        HandshakeClient.Timeouts(connectMs: settings.connectTimeoutMs, replyMs: settings.handshakeReplyMs, auth: authenticator)
    }

    private func fetchDescriptor(host: String, port: UInt16, name: String) throws -> SegmentDescriptor {
        do {
            let reply = try HandshakeClient.exchange(host: host, port: port,
                                                     message: .init(kind: .metadata, json: localDescriptor.json.compactText),
                                                     timeouts: handshakeTimeouts, maxLength: settings.handshakeMaxLength)
            return try SegmentDescriptor.decode(try JSONValue.parse(reply.json))
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "\(error)")
        }
    }

    // MARK: - Batches

    /// Allocates a batch that can hold `capacity` tasks.
    public func allocateBatch(capacity: Int) throws -> BatchID {
        guard capacity > 0, capacity <= 1 << 20 else { throw EngineError.invalidArgument("batch capacity \(capacity) (1...1048576)") }
        return state.withLock { state in
            let id = state.nextBatch
            state.nextBatch += 1
            state.batches[id] = Batch(id: id, capacity: capacity)
            return id
        }
    }

    /// Frees a batch; refuses while tasks are in flight (as upstream).
    public func freeBatch(_ id: BatchID) throws {
        try state.withLock { state in
            guard let batch = state.batches[id] else { throw EngineError.invalidBatch(id) }
            if batch.hasUnfinishedTasks { throw EngineError.batchBusy("batch \(id) still has tasks in flight") }
            state.batches.removeValue(forKey: id)
        }
    }

    private func batch(_ id: BatchID) throws -> Batch {
        guard let batch = state.withLock({ $0.batches[id] }) else { throw EngineError.invalidBatch(id) }
        return batch
    }

    /// A request checked against local and remote registrations, bound to its route.
    private struct Planned {
        var request: TransferRequest
        var peer: Peer
        /// The plugin's handle of the peer when the plugin carries this request, else nil (TCP).
        var pluginPeer: UInt64?
        /// Between two ranges of this engine's own host memory: a memmove, no transport.
        var local = false
        var viaPlugin: Bool { pluginPeer != nil }
    }

    /// What planning learned about the segment of the previous request: the requests of a
    /// batch mostly name one segment, so its peer and route are looked up once.
    private struct PlanCache {
        var segment: SegmentHandle
        var peer: Peer
        /// The protocol last served and whether the plugin carries it.
        var served: String?
        var pluginPeer: UInt64?
        var refreshed: Bool
    }

    /// Checks every request before any is dispatched, so a bad one loses nothing.
    private func plan(_ requests: [TransferRequest]) throws -> [Planned] {
        var cache: PlanCache? = nil
        var planned: [Planned] = []
        planned.reserveCapacity(requests.count)
        for request in requests { planned.append(try plan(request, cache: &cache)) }
        return planned
    }

    /// Checks one request and binds it to its route (no arrays built: a synchronous transfer
    /// plans one request per call, and under emulation each allocation shows).
    private func plan(_ request: TransferRequest, cache: inout PlanCache?) throws -> Planned {
        if cache?.segment != request.segment {
            cache = PlanCache(segment: request.segment, peer: try peer(request.segment), served: nil, pluginPeer: nil, refreshed: false)
        }
        let peer = cache!.peer
        if request.length == 0 { return Planned(request: request, peer: peer, pluginPeer: nil) }
        if request.segment == 0, registry.isLocalHostCopy(request) {
            return Planned(request: request, peer: peer, pluginPeer: nil, local: true)
        }
        guard registry.region(containing: request.localAddress, length: request.length) != nil else {
            throw EngineError.addressNotRegistered(address: request.localAddress, length: request.length, side: "local")
        }
        // Looked up under the lock, without copying the descriptor (its arrays and dictionaries).
        func lookup() -> (protocolName: String, tcpDataPort: UInt16, served: String?)? {
            state.withLock { _ in
                guard let remote = peer.descriptor.buffer(containing: request.remoteAddress, length: request.length) else { return nil }
                // A buffer may name its own protocol (upstream's multi-protocol form), e.g.
                // storage served by a plugin next to memory served by TCP.
                return (peer.descriptor.protocolName, peer.descriptor.tcpDataPort, remote.ownProtocol)
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
        let served = found.served ?? found.protocolName
        let pluginPeer: UInt64?
        if let known = cache!.served, known == served { pluginPeer = cache!.pluginPeer } else {
            pluginPeer = plugin != nil && served == plugin!.protocolName ? pluginRoute(for: peer) : nil
            cache!.served = served
            cache!.pluginPeer = pluginPeer
        }
        if pluginPeer == nil && found.tcpDataPort == 0 {
            throw EngineError.segmentUnavailable(name: peer.name, reason: "it serves '\(found.protocolName)' and publishes no TCP data port")
        }
        return Planned(request: request, peer: peer, pluginPeer: pluginPeer)
    }

    private func channel(for peer: Peer) -> TCPChannel {
        state.withLock { _ in
            if let channel = peer.channel { return channel }
            let host = peer.descriptor.name == segmentName ? bindHost : peer.host
            let channel = TCPChannel(host: host, port: peer.descriptor.tcpDataPort,
                                     acknowledged: settings.useV2Client && peer.descriptor.tcpProtocolVersion >= 2,
                                     settings: .init(maxLanes: settings.lanesPerPeer, connectTimeoutMs: settings.connectTimeoutMs,
                                                     statusTimeoutMs: settings.statusTimeoutMs, laneIdleMs: 30_000, auth: authenticator),
                                     logger: logger)
            peer.channel = channel
            return channel
        }
    }

    /// The plugin's handle of `peer` when the plugin can reach it (opened on first use), else
    /// nil: a peer the plugin reports unreachable (TE_ERR_PEER_UNREACHABLE) is served over TCP
    /// from then on.
    private func pluginRoute(for peer: Peer) -> UInt64? {
        let (unreachable, known) = state.withLock { _ in (peer.pluginUnreachable, peer.pluginPeer) }
        if unreachable { return nil }
        if let known { return known }
        do {
            return try pluginPeer(for: peer)
        } catch {
            state.withLock { _ in peer.pluginUnreachable = true }
            logger.info("\(plugin!.protocolName) cannot reach \(peer.name), using tcp for it: \(error)")
            return nil
        }
    }

    private func pluginPeer(for peer: Peer) throws -> UInt64 {
        if let handle = state.withLock({ _ in peer.pluginPeer }) { return handle }
        let handle = try plugin!.openPeer(segment: peer.name, descriptor: state.withLock { _ in peer.descriptor })
        state.withLock { _ in peer.pluginPeer = handle }
        return handle
    }

    /// Submits requests into a batch without blocking on I/O. Every request is
    /// validated first; if any is invalid nothing is submitted.
    public func submit(_ requests: [TransferRequest], to batchID: BatchID) throws {
        try submit(planned: try plan(requests), to: batchID)
    }

    /// Dispatches already validated requests.
    private func submit(planned: [Planned], to batchID: BatchID) throws {
        let batch = try self.batch(batchID)
        // Plugins get the same pieces as TCP, so a large request spreads over their workers too,
        // unless they cut requests themselves (slices, max message size).
        let pluginPiece = plugin?.splitsRequests == true ? UInt64.max : settings.splitSize
        let sliceCounts = planned.map { p -> Int in
            if p.request.length == 0 { return 0 }
            if p.local { return 1 }
            let piece = p.viaPlugin ? pluginPiece : settings.splitSize
            return Int((p.request.length - 1) / piece + 1)
        }
        let first = try batch.addTasks(sliceCounts: sliceCounts)
        var tcpWork: [ObjectIdentifier: (TCPChannel, [TCPSlice])] = [:]
        var pluginWork: [(op: TransferRequest.Operation, local: UInt64, peer: UInt64, remote: UInt64, length: UInt64, batch: Batch, task: Int)] = []
        for (index, p) in planned.enumerated() where p.request.length > 0 {
            let r = p.request
            if p.local {
                let copied = registry.copyLocally(r)
                batch.sliceFinished(task: first + index, bytes: copied ? r.length : 0,
                                    error: copied ? nil : "local copy of \(r.length) bytes: a range was unregistered meanwhile")
                continue
            }
            if p.viaPlugin {
                var offset: UInt64 = 0
                while offset < r.length {
                    let size = min(pluginPiece, r.length - offset)
                    pluginWork.append((r.operation, r.localAddress + offset, p.pluginPeer!, r.remoteAddress + offset, size, batch, first + index))
                    offset += size
                }
                continue
            }
            let channel = channel(for: p.peer)
            var offset: UInt64 = 0
            var slices: [TCPSlice] = []
            while offset < r.length {
                let size = min(settings.splitSize, r.length - offset)
                slices.append(TCPSlice(operation: r.operation == .read ? .read : .write, localAddress: r.localAddress + offset,
                                       remoteAddress: r.remoteAddress + offset, length: size, batch: batch, task: first + index))
                offset += size
            }
            tcpWork[ObjectIdentifier(channel), default: (channel, [])].1 += slices
        }
        for (_, work) in tcpWork { work.0.enqueue(work.1) }
        if !pluginWork.isEmpty { plugin!.submit(pluginWork) }
    }

    /// Status of one task of a batch.
    public func status(batch id: BatchID, task: Int) throws -> TransferStatus {
        guard let status = try batch(id).status(task: task) else {
            throw EngineError.invalidArgument("batch \(id) has no task \(task)")
        }
        return status
    }

    /// Statuses of every task of a batch.
    public func statuses(batch id: BatchID) throws -> [TransferStatus] { try batch(id).statuses }

    /// Waits until every task of the batch finished or `timeoutNs` passed; true when all finished.
    public func wait(batch id: BatchID, timeoutNs: UInt64) throws -> Bool {
        try batch(id).waitAll(deadline: MonotonicClock.nanoseconds() + timeoutNs)
    }

    /// Mooncake's sync timeout: MC_TRANSFER_TIMEOUT (30 s) plus 1 ns per byte.
    func syncTimeout(bytes: UInt64) -> UInt64 { settings.transferTimeoutNs + bytes }

    /// Runs one transfer to completion. Small TCP transfers run on the calling
    /// thread over a pooled connection (no thread hand-off); large ones spread
    /// over the peer's lanes.
    public func transferSync(_ operation: TransferRequest.Operation, localAddress: UInt64, segment: SegmentHandle,
                             remoteAddress: UInt64, length: UInt64) throws {
        let request = TransferRequest(operation: operation, localAddress: localAddress, segment: segment, remoteAddress: remoteAddress, length: length)
        var cache: PlanCache? = nil
        let planned = try plan(request, cache: &cache)
        if length == 0 { return }
        if planned.local {
            guard registry.copyLocally(request) else {
                throw EngineError.addressNotRegistered(address: remoteAddress, length: length, side: "local (unregistered during the copy)")
            }
            return
        }
        if !planned.viaPlugin && length <= settings.splitSize {
            do {
                try channel(for: planned.peer).performInline(operation: operation == .read ? .read : .write, localAddress: localAddress,
                                                             remoteAddress: remoteAddress, length: length)
                return
            } catch {
                throw EngineError.transferFailed("\(operation) of \(length) bytes to \(planned.peer.name): \(error)")
            }
        }
        if let pluginPeer = planned.pluginPeer, let plugin, length <= settings.splitSize || plugin.splitsRequests {
            // One request through the plugin, harvested on this thread: no batch, no hand-off.
            let deadline = MonotonicClock.nanoseconds() + syncTimeout(bytes: length)
            switch plugin.transferOne(operation, local: localAddress, peer: pluginPeer, remote: remoteAddress, length: length,
                                      spinNs: settings.pluginSyncSpinNs, small: length <= 65536, deadline: deadline) {
            case .completed: return
            case .failed(let reason): throw EngineError.transferFailed(reason)
            case .timedOut: throw EngineError.timeout("\(operation) of \(length) bytes to \(planned.peer.name)")
            }
        }
        try runSync([planned])
    }

    /// How many synchronous plugin transfers were completed by a thread other than their caller.
    var syncCompletionsReapedElsewhere: Int { plugin?.syncReapedElsewhere.load(ordering: .relaxed) ?? 0 }

    /// Submits requests in a temporary batch and waits for all of them.
    public func transferBatchSync(_ requests: [TransferRequest]) throws {
        try runSync(try plan(requests))
    }

    /// Submits validated requests in a temporary batch and waits for all of them.
    private func runSync(_ planned: [Planned]) throws {
        let id = try allocateBatch(capacity: max(1, planned.count))
        defer { try? freeBatch(id) }
        try submit(planned: planned, to: id)
        plugin?.harvest()
        let bytes = planned.reduce(0) { $0 + $1.request.length }
        guard try wait(batch: id, timeoutNs: syncTimeout(bytes: bytes)) else {
            throw EngineError.timeout("batch of \(planned.count) transfers (\(bytes) bytes)")
        }
        if let failed = try statuses(batch: id).first(where: { $0.state != .completed }) {
            throw EngineError.transferFailed(failed.error ?? "\(failed.state)")
        }
    }

    // MARK: - Notifications and probes

    /// Notifications dropped because the queue was full (the oldest go first).
    public var droppedNotifications: UInt64 { state.withLock { $0.notifications.dropped } }

    /// Notifications received since the last call.
    public func takeNotifications() -> [TransferNotification] {
        state.withLock { $0.notifications.takeAll() }
    }

    /// Sends a notification to an opened segment's handshake port.
    public func sendNotification(_ notification: TransferNotification, to handle: SegmentHandle) throws {
        let peer = try self.peer(handle)
        let body = JSONValue.object(["name": .string(notification.name), "notify_msg": .string(notification.message)]).compactText
        let reply = try HandshakeClient.exchange(host: handle == 0 ? bindHost : peer.host, port: peer.rpcPort,
                                                 message: .init(kind: .notify, json: body), timeouts: handshakeTimeouts)
        guard let message = (try? JSONValue.parse(reply.json))?["notify_msg"]?.stringValue, !message.isEmpty else {
            throw EngineError.transferFailed("peer \(peer.name) did not acknowledge the notification")
        }
    }

    /// Sends `notification` to `segment` once every task of the batch has finished
    /// (submitTransferWithNotify). Returns at once; the wait runs on its own thread.
    public func notifyWhenDone(batch id: BatchID, segment: SegmentHandle, notification: TransferNotification) throws {
        let batch = try self.batch(id)
        let timeout = syncTimeout(bytes: 0) * 4
        try OSThread.spawn(name: "te-notify") { [weak self] in
            guard batch.waitAll(deadline: MonotonicClock.nanoseconds() + timeout), let self else { return }
            do { try self.sendNotification(notification, to: segment) } catch {
                self.logger.warning("notification '\(notification.name)' after batch \(id) was not delivered: \(error)")
            }
        }
    }

    /// Sends a Probe to a segment's handshake port (liveness check, as SGLang uses it). The
    /// port is found as for opening the segment: from the P2P name or the peer's rpc_meta entry.
    public func probe(segmentName name: String) throws {
        let target = name == segmentName ? (host: bindHost, port: rpcPort) : try handshakeAddresses.resolve(name)
        let reply: HandshakeWire.Message
        do {
            reply = try HandshakeClient.exchange(host: target.host, port: target.port, message: .init(kind: .probe, json: "{}"),
                                                 timeouts: handshakeTimeouts)
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "probe of \(target.host):\(target.port): \(error)")
        }
        guard (try? JSONValue.parse(reply.json))?["status"]?.stringValue == "success" else {
            throw EngineError.transferFailed("probe of \(name) answered \(reply.json)")
        }
    }

    /// Answers one handshake-port message.
    private func answerHandshake(_ message: HandshakeWire.Message) -> String? {
        switch message.kind {
        case .metadata:
            return localDescriptor.json.compactText
        case .probe:
            return #"{"status":"success"}"#
        case .notify:
            guard let body = try? JSONValue.parse(message.json) else { return nil }
            let notification = TransferNotification(name: body["name"]?.stringValue ?? "", message: body["notify_msg"]?.stringValue ?? "")
            let report: UInt64? = state.withLock { state in
                guard state.notifications.append(notification) > 0,
                      state.notifications.dropWarnings.record(now: MonotonicClock.nanoseconds()) != nil else { return nil }
                return state.notifications.dropped
            }
            if let report {
                logger.warning("notification queue full (\(settings.notifyMaxCount) notifications, \(settings.notifyMaxBytes) bytes): dropped the oldest; \(report) dropped so far (take them with getNotifs / get_notifies, or raise MC_NOTIFY_MAX_COUNT / MC_NOTIFY_MAX_BYTES)")
            }
            return #"{"name":"","notify_msg":"success"}"#
        case .connection:
            if let plugin { return plugin.handleHandshake(message.json) }
            // A TCP-only engine answers with an empty handshake descriptor, as upstream.
            return #"{"local_gid":"","local_lid":0,"local_nic_path":"","peer_nic_path":"","qp_num":[],"reply_msg":""}"#
        }
    }
}
