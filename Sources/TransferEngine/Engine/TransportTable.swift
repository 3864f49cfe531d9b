import Logging

/// The transports an engine holds: installed at start from the protocol list, and at run time
/// with `installTransport` / `uninstallTransport`. TCP is always present and always last.
extension TransferEngine {
    /// The handshake key that names the transport a connection handshake is for, when an engine
    /// holds several (upstream peers do not send it: theirs go to the first plugin).
    static let handshakeTransportKey = "te_transport"

    /// Creates a plugin instance for `protocolName` and installs it before tcp. Existing
    /// registrations are registered with it too (rolled back if one fails). Callers after start
    /// hold `membership`.
    func install(plugin loaded: LoadedPlugin, protocolName: String) throws {
        let options = Self.pluginOptions(configuration: configuration, segmentName: segmentName, environment: environment,
                                         protocolName: protocolName, peerAuthentication: authenticator != nil)
        let handshakeTimeouts = HandshakeClient.Timeouts(connectMs: settings.connectTimeoutMs, replyMs: settings.handshakeReplyMs, auth: authenticator)
        let maxLength = settings.handshakeMaxLength
        let transport = try PluginTransport(plugin: loaded, protocolName: protocolName, optionsJSON: options,
                                            syncSpinNs: settings.pluginSyncSpinNs, inlineLimit: settings.splitSize,
                                            releaseGraceNs: UInt64(settings.freeBatchWaitMs) * 1_000_000, recordsDeviceMetrics: metrics != nil,
                                            logger: logger) { [weak self] peer, request in
            guard let self else { throw EngineError.invalidArgument("the engine is shutting down") }
            let target = try self.handshakeAddress(of: peer)
            return try HandshakeClient.exchange(host: target.host, port: target.port,
                                                message: .init(kind: .connection, json: Self.tagHandshake(request, protocolName: protocolName)),
                                                timeouts: handshakeTimeouts, maxLength: maxLength).json
        }
        var registered: [UInt64] = []
        do {
            for region in registry.all {
                let fragment = try transport.register(address: region.address, length: region.length, location: region.location)
                registered.append(region.address)
                state.withLock { $0.bufferFragments[region.address, default: [:]][protocolName] = fragment }
            }
        } catch {
            for address in registered {
                try? transport.unregister(address: address)
                state.withLock { _ = $0.bufferFragments[address]?.removeValue(forKey: protocolName) }
            }
            transport.shutdown()
            throw error
        }
        let added = state.withLock { state -> Bool in
            guard !state.stopped else { return false }
            state.transports.insert(transport, at: state.transports.count - 1)
            state.routeGeneration += 1
            return true
        }
        if !added {
            transport.shutdown()
            throw EngineError.invalidArgument("the engine is shutting down")
        }
    }

    /// Installs `name` at run time (upstream's installTransport). Installing an installed
    /// transport (tcp included) does nothing. A name whose plugin or hardware is missing is an error.
    public func installTransport(_ name: String) throws {
        let wanted = name.trimmingCharacters(in: .whitespaces).lowercased()
        if activeProtocols.contains(wanted) { return }
        var strictEnvironment = environment
        strictEnvironment["MC_STRICT_PROTOCOL"] = "1"
        let chosen = try ProtocolSelector.select(requested: wanted, catalog: catalog, environment: strictEnvironment) {
            Self.pluginOptions(configuration: self.configuration, segmentName: "", environment: self.environment, protocolName: $0)
        }
        guard let loaded = chosen.plugin else { return }
        let installed = try membership.withLock { _ -> Bool in
            if activeProtocols.contains(chosen.effective) { return false }  // a concurrent install won
            try install(plugin: loaded, protocolName: chosen.effective)
            return true
        }
        guard installed else { return }
        logger.info("installed transport \(chosen.effective) (for '\(wanted)'); protocols now \(activeProtocols.joined(separator: ","))")
        // Installed even if publishing fails: the refresh publishes it later.
        do { try republishDescriptor() } catch {
            logger.warning("installed \(chosen.effective); publishing the descriptor failed (retried by the refresh): \(error)")
        }
    }

    /// Removes an installed plugin transport at run time: its peer links close and requests
    /// route over the remaining transports. tcp cannot be removed.
    public func uninstallTransport(_ name: String) throws {
        let wanted = name.trimmingCharacters(in: .whitespaces).lowercased()
        guard wanted != "tcp" else { throw EngineError.invalidArgument("tcp is built in and cannot be uninstalled") }
        try membership.withLock { _ in try removeTransport(wanted) }
        do { try republishDescriptor() } catch { logger.warning("uninstalled \(wanted); publishing the descriptor failed: \(error)") }
        logger.info("uninstalled transport \(wanted); protocols now \(activeProtocols.joined(separator: ","))")
    }

    /// Takes `wanted` out of the installed set, closes its links and shuts it down (membership held).
    private func removeTransport(_ wanted: String) throws {
        let (removed, links): ((any Transport)?, [any TransportPeer]) = state.withLock { state in
            guard let index = state.transports.firstIndex(where: { $0.protocolName == wanted }) else { return (nil, []) }
            let transport = state.transports.remove(at: index)
            state.routeGeneration += 1
            var links: [any TransportPeer] = []
            for peer in state.peers.values {
                if let link = peer.links.removeValue(forKey: ObjectIdentifier(transport)) { links.append(link) }
                peer.unreachable.removeValue(forKey: wanted)
                peer.forgetRoutes()
                peer.syncMeters.removeAll { $0.id == ObjectIdentifier(transport) }
            }
            for address in state.bufferFragments.keys { state.bufferFragments[address]?.removeValue(forKey: wanted) }
            return (transport, links)
        }
        guard let removed else {
            throw EngineError.invalidArgument("transport '\(wanted)' is not installed (installed: \(activeProtocols.joined(separator: ",")))")
        }
        links.forEach { $0.close() }
        removed.shutdown()
    }

    /// The installed transport serving `name`, if any.
    func transport(named name: String) -> (any Transport)? {
        state.withLock { $0.transports.first { $0.protocolName == name } }
    }

    /// Adds the handshake key naming the transport a plugin's connection handshake is for.
    static func tagHandshake(_ request: String, protocolName: String) -> String {
        guard case .object(var object)? = try? JSONValue.parse(request) else { return request }
        object[handshakeTransportKey] = .string(protocolName)
        return JSONValue.object(object).compactText
    }

    /// Answers a connection handshake: the transport it names, else the first plugin (upstream
    /// peers name none), else tcp's empty answer.
    func answerConnection(_ request: String) -> String? {
        var body = request
        var named: String?
        if case .object(var object)? = try? JSONValue.parse(request), let name = object.removeValue(forKey: Self.handshakeTransportKey) {
            named = name.stringValue
            body = JSONValue.object(object).compactText
        }
        let transports = state.withLock { $0.transports }
        let target = named.flatMap { name in transports.first { $0.protocolName == name } } ?? transports.first!
        return target.handleHandshake(body)
    }
}
