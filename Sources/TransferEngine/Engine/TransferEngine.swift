import FoundationEssentials
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The transfer engine: owns local memory registrations, the handshake and
/// TCP data listeners, opened peer segments, batches, and the installed
/// transports (the plugins named in `protocol`, then TCP), between which a
/// router picks per request and fails over.
///
/// Its parts, one file each: this facade (start and stop), `EngineSettings`,
/// `EngineMemory` (registrations), `SegmentTable` (opened peers), `BatchTable`,
/// `EngineTransfers` (planning and dispatch), `TransportTable` (installed
/// transports), `MetadataPublisher` and `EngineHandshake` (the handshake port).
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
    /// The protocol selection of the first protocol in the list (effective protocol, fallback reason).
    public let selection: ProtocolSelector.Selection
    /// Every protocol of the list, as selected at start.
    public let selections: [ProtocolSelector.Selection]
    /// Set when peers must prove the shared secret (MC_AUTH_SECRET); nil: authentication off.
    let authenticator: PeerAuthenticator?

    let logger: Logger
    let registry = MemoryRegistry()
    let metadataStore: MetadataStore?
    let keys: MetadataKeys
    /// Where a named segment's handshake port is (P2P name or the metadata server's rpc_meta).
    let handshakeAddresses: HandshakeAddressResolver
    let settings: Settings
    let bindHost: String
    /// The host published for peers in rpc_meta: the advertised one (C API ip_or_host_name), else `bindHost`.
    let publishedHost: String
    let environment: [String: String]
    let catalog: PluginCatalog
    let router: Router
    /// Metric handles, or nil when recording was off when the engine was created.
    let metrics: EngineMetrics?
    /// The previous device readings, for getNicLoadStats' rates.
    let nicLoad = NicLoadTracker()
    let tcp: TCPTransport
    private let dataServer: TCPDataServer
    private var handshakeServer: HandshakeServer?
    /// What the first-contact rehearsal at start-up did (set once, in init).
    private(set) var rehearsal = FirstContactRehearsal()
    let state: ConditionLock<State>
    /// Serializes changes of what is registered with which transport (registrations, installs,
    /// removals), so every buffer is registered with exactly the installed transports. Held across
    /// local plugin calls, never across network I/O (the descriptor is republished after it).
    let membership = ConditionLock(())

    struct State {
        var peers: [SegmentHandle: Peer] = [:]
        var handles: [String: SegmentHandle] = [:]
        var nextHandle: SegmentHandle = 1
        var batches: [BatchID: Batch] = [:]
        var nextBatch: BatchID = 1
        var notifications: NotificationQueue
        var managed: [UInt64: (length: UInt64, from: String?)] = [:]
        /// Per buffer address, each transport's descriptor keys for it.
        var bufferFragments: [UInt64: [String: [String: JSONValue]]] = [:]
        /// Installed transports: plugins in configured order, then tcp.
        var transports: [any Transport]
        /// Bumped whenever routes may change (a transport installed or removed, a path failed).
        var routeGeneration: UInt64 = 0
        var stopped = false
        /// Bumped by every registration change: the own segment's cached descriptor is replaced
        /// only by one built at the same or a later generation (two threads may rebuild it at once),
        /// and the kept descriptor text is rebuilt.
        var registrationGeneration: UInt64 = 0
        var selfDescriptorGeneration: UInt64 = 0
        /// The descriptor's text as last built (TCP-only engines; see `describedText`).
        var descriptorText: DescriptorText?
        /// Transport hints already warned about (one warning each).
        var warnedHints: Set<String> = []
    }

    /// Starts an engine: validates the configuration, binds the handshake and data listeners,
    /// and installs each protocol of the list whose plugin and hardware are present (one
    /// warning per missing one; MC_STRICT_PROTOCOL=1 makes it an error), then TCP.
    public init(configuration requested: EngineConfiguration, environment: [String: String] = ProcessInfo.processInfo.environment,
                logger: Logger = Logger(label: "transfer-engine")) throws {
        let upstream = UpstreamEnvironment.apply(requested, environment: environment)
        var configuration = upstream.configuration
        if configuration.localHostname.trimmingCharacters(in: .whitespaces).isEmpty {
            configuration.localHostname = try Self.routedAddress(metadataServer: configuration.metadataServer, logger: logger)
        }
        for line in upstream.notices { logger.info("\(line)") }
        for line in upstream.warnings { logger.warning("\(line)") }
        self.configuration = configuration
        self.logger = logger
        self.environment = environment
        self.settings = try Settings(environment: environment)
        authenticator = try PeerAuthenticator.secret(environment: environment, configured: configuration.authSecret).map(PeerAuthenticator.init(secret:))
        router = Router(cooldownNs: UInt64(settings.pathCooldownMs) * 1_000_000)
        EngineMetricsRegistry.enableIfAsked(environment)
        metrics = EngineMetrics.make()
        tcp = TCPTransport(channelSettings: .init(maxLanes: settings.lanesPerPeer, connectTimeoutMs: settings.connectTimeoutMs,
                                                  statusTimeoutMs: settings.statusTimeoutMs, laneIdleMs: 30_000, auth: authenticator),
                           useV2: settings.useV2Client, inlineLimit: settings.splitSize, logger: logger)
        state = ConditionLock(State(notifications: NotificationQueue(maxCount: settings.notifyMaxCount, maxBytes: settings.notifyMaxBytes),
                                    transports: [tcp]))

        keys = MetadataKeys(environment: environment)
        let store: (any MetadataStore)?
        switch try MetadataServer.parse(configuration.metadataServer) {
        case .p2pHandshake: store = nil
        case .http(let url):
            store = try HTTPMetadataStore(url: url, timeoutMs: settings.metadataTimeoutMs,
                                                  token: environment["MC_METADATA_TOKEN"].flatMap { $0.isEmpty ? nil : $0 })
        case .redis(let address):
            store = try RedisMetadataStore(address: address, environment: environment, timeoutMs: settings.metadataTimeoutMs)
        case .etcd(let endpoints):
            store = try EtcdMetadataStore(endpoints: endpoints, timeoutMs: settings.metadataTimeoutMs,
                                                  credentials: try EtcdMetadataStore.credentials(environment: environment))
        }
        if let store, let metrics {
            metadataStore = MeteredMetadataStore(inner: store, metrics: metrics, backend: try MetadataServer.parse(configuration.metadataServer).backend)
        } else {
            metadataStore = store
        }
        handshakeAddresses = HandshakeAddressResolver(store: metadataStore, keys: keys, budgetMs: settings.metadataTimeoutMs)

        let local = try HostPort.parse(configuration.localHostname)
        let advertisedHost = configuration.advertisedHost.flatMap { $0.isEmpty ? nil : $0 }
        let advertised = advertisedHost ?? local.host
        if let bind = environment["MC_TCP_BIND_ADDRESS"], !bind.isEmpty { bindHost = bind } else { bindHost = advertised }
        publishedHost = advertisedHost ?? bindHost
        if metadataStore != nil && Self.unreachableFromOtherHosts(publishedHost) {
            let line = "the address published to the metadata server \(configuration.metadataServer) is \(publishedHost), a loopback or unspecified address: "
                + "engines on other hosts cannot reach segment \(configuration.localHostname). Set local_hostname (MOONCAKE_LOCAL_HOSTNAME, "
                + "the config file; the C API's ip_or_host_name) or MC_TCP_BIND_ADDRESS to an address they reach"
            logger.warning("\(line)")
        }

        catalog = PluginCatalog(environment: environment)
        let (chosen, notes) = try ProtocolSelector.selectList(requested: configuration.protocolName, catalog: catalog, environment: environment) {
            Self.pluginOptions(configuration: configuration, segmentName: "", environment: environment, protocolName: $0)
        }
        selections = chosen
        selection = chosen.first ?? ProtocolSelector.Selection(requested: "tcp", effective: "tcp")
        if !notes.isEmpty { logger.info("protocol list '\(configuration.protocolName)': \(notes.joined(separator: "; "))") }
        for choice in chosen {
            if let warning = choice.warningLine { logger.warning("\(warning)") }
            if let notice = choice.notice { logger.info("\(notice)") }
        }

        // P2P: a port written in local_hostname is used when free (upstream always picks one at
        // random); the name peers use is host:rpc_port either way, and get_rpc_port reports it.
        let (handshakeListener, portTaken) = try PortAllocator.listen(host: bindHost, preferred: metadataStore == nil ? local.port : nil,
                                                                      required: configuration.rpcPort, range: settings.portRange)
        if let portTaken, let port = local.port {
            logger.info("handshake port \(port) from local_hostname is not free (\(portTaken)); using \(handshakeListener.localAddress.port)")
        }
        let dataListener = try PortAllocator.listen(host: bindHost, range: settings.portRange)
        rpcPort = handshakeListener.localAddress.port
        // P2P: the segment name is host:rpc_port. With a metadata server it is local_hostname as given.
        segmentName = metadataStore == nil ? HostPort(host: advertised, port: rpcPort).description : configuration.localHostname
        dataServer = try TCPDataServer(listener: dataListener, registry: registry, logger: logger, payloadTimeoutMs: settings.statusTimeoutMs,
                                      spinNanoseconds: settings.serverSpinNs, idleTimeoutMs: settings.dataIdleTimeoutMs,
                                      maxPerAddress: settings.dataMaxPerAddress, auth: authenticator,
                                      served: metrics?.served)
        dataPort = dataServer.port

        do {
            for choice in chosen {
                guard let loaded = choice.plugin else { continue }
                try install(plugin: loaded, protocolName: choice.effective)
            }
        } catch {
            shutdown()
            throw error
        }
        // Before the handshake port answers, so no peer can open this segment yet.
        rehearsal = warmUpFirstContact()
        handshakeServer = try HandshakeServer(listener: handshakeListener, maxLength: settings.handshakeMaxLength, limits: settings.handshakeLimits,
                                              auth: authenticator, logger: logger,
                                              inline: .init(kinds: [.metadata, .probe]) { [weak self] in self?.answerHandshakeInline($0) },
                                              onBadMessage: Self.counting(metrics?.handshakeFailures)) { [weak self] message in
            self?.answerHandshake(message)
        }
        if let store = metadataStore {
            do {
                try publish(store)
            } catch {
                shutdown()
                throw EngineError.invalidMetadataServer("\(error)")
            }
            startMetadataRefresh(store)
        }
        let authNote = authenticator != nil ? ", peers must authenticate (shared secret)" : ""
        logger.info("engine ready: segment \(segmentName), protocols \(activeProtocols.joined(separator: ",")), data port \(dataPort), bound to \(bindHost)\(authNote)")
        startMetricsReport()
    }

    /// Stops the listeners, lanes and transports. Registered memory stays the caller's; heap
    /// memory from `allocateManagedBuffer` is taken out of the registry (once no local copy uses
    /// it) and freed.
    public func shutdown() {
        let (peers, transports): ([Peer], [any Transport]) = state.withLock(notify: true) { state in
            if state.stopped { return ([], []) }
            state.stopped = true
            return (Array(state.peers.values), state.transports)
        }
        handshakeServer?.stop()
        dataServer.stop()
        for links in state.withLock({ _ in peers.map { Array($0.links.values) } }) { links.forEach { $0.close() } }
        transports.forEach { $0.shutdown() }
        // What the transports did not end is canceled (its requests leave the in-flight count).
        for batch in state.withLock({ Array($0.batches.values) }) { batch.cancel() }
        // Heap memory from allocateManagedBuffer goes with the engine (nothing can reach it now;
        // a transport's own memory went with the transport).
        let managed: [UInt64: (length: UInt64, from: String?)] = state.withLock { state in
            defer { state.managed.removeAll(); state.registrationGeneration += 1 }  // the kept descriptor text goes stale
            return state.managed
        }
        for (address, entry) in managed where entry.from == nil {
            _ = try? registry.unregister(address: address)
            free(UnsafeMutableRawPointer(bitPattern: UInt(address)))
        }
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

    /// The protocol peers see first: the first installed plugin's, else `tcp`.
    public var activeProtocol: String { activeProtocols.first ?? "tcp" }

    /// Every installed transport's protocol, in routing order (tcp last).
    public var activeProtocols: [String] { state.withLock { $0.transports.map(\.protocolName) } }
}

extension TransferEngine {
    /// Runs `body` every `interval` (ns) on a thread named `name` until shutdown. The thread holds
    /// the engine only while `body` runs: an engine its owner dropped is freed (and shut down) at
    /// once, not an interval later.
    func repeatUntilShutdown(thread name: String, every interval: UInt64, _ body: @escaping @Sendable (TransferEngine) -> Void) throws {
        let state = self.state
        try OSThread.spawn(name: name) { [weak self] in
            while state.wait(deadline: MonotonicClock.nanoseconds() + interval, until: { $0.stopped ? true : nil }) == nil {
                guard let engine = self else { return }
                body(engine)
            }
        }
    }
}
