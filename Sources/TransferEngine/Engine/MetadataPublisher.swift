import Logging

/// What this engine tells others about itself (its rpc_meta entry and segment descriptor on
/// the metadata server) and how it learns about them (the metadata server, or the peer's
/// handshake port in P2P mode).
extension TransferEngine {
    /// Writes our rpc_meta entry and segment descriptor to the metadata server (with retries).
    func publish(_ store: MetadataStore) throws {
        let ttl = MeteredMetadataStore.unwrapped(store) is HTTPMetadataStore ? nil : settings.metadataTTLSeconds
        let rpcMeta = JSONValue.object(["ip_or_host_name": .string(publishedHost), "rpc_port": .uint(UInt64(rpcPort))]).compactText
        try withRetries(budgetMs: settings.metadataTimeoutMs) {
            if let etcd = MeteredMetadataStore.unwrapped(store) as? EtcdMetadataStore { try etcd.refreshLease(ttlSeconds: settings.metadataTTLSeconds) }
            try store.put(keys.rpcMeta(segmentName), rpcMeta, ttlSeconds: ttl)
            try store.put(keys.segment(segmentName), localDescriptor.json.compactText, ttlSeconds: ttl)
        }
    }

    /// Re-publishes every TTL/3 seconds until shutdown: refreshes the TTL and restores our keys
    /// after a metadata server restart.
    func startMetadataRefresh(_ store: MetadataStore) {
        let interval = UInt64(max(1, settings.metadataTTLSeconds / 3)) * 1_000_000_000
        do {
            try repeatUntilShutdown(thread: "te-meta-keep", every: interval) { engine in
                do { try engine.publish(store) } catch { engine.logger.warning("metadata refresh failed (will retry): \(error)") }
            }
        } catch {
            logger.warning("cannot start the metadata refresh thread; keys expire after \(settings.metadataTTLSeconds) s: \(error)")
        }
    }

    /// For an empty local_hostname: the address of the interface that routes to the metadata
    /// server (said in one INFO line).
    static func routedAddress(metadataServer: String, logger: Logger) throws -> String {
        guard let endpoint = try MetadataServer.parse(metadataServer).endpoint else {
            throw EngineError.invalidConfiguration("local_hostname is empty; with P2PHANDSHAKE it must name this host")
        }
        guard let address = LocalAddress.toward(host: endpoint.host, port: endpoint.port ?? 0) else {
            throw EngineError.invalidConfiguration("local_hostname is empty and no local address routes to the metadata server \(endpoint); set local_hostname")
        }
        logger.info("local_hostname is empty: using \(address), the address of the interface that routes to the metadata server \(endpoint)")
        return address
    }

    /// Re-publishes the descriptor after a registration change (metadata-server mode).
    func republishDescriptor() throws {
        guard let store = metadataStore else { return }
        let ttl = MeteredMetadataStore.unwrapped(store) is HTTPMetadataStore ? nil : settings.metadataTTLSeconds
        let key = keys.segment(segmentName)
        try withRetries(budgetMs: settings.metadataTimeoutMs) {
            try store.put(key, localDescriptor.json.compactText, ttlSeconds: ttl)
        }
    }

    /// Where a named segment is and what it holds: over the handshake port (P2P) or from the metadata server.
    func locate(_ name: String) throws -> (host: String, port: UInt16, descriptor: SegmentDescriptor) {
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

    var handshakeTimeouts: HandshakeClient.Timeouts {
        HandshakeClient.Timeouts(connectMs: settings.connectTimeoutMs, replyMs: settings.handshakeReplyMs, auth: authenticator)
    }

    private func fetchDescriptor(host: String, port: UInt16, name: String) throws -> SegmentDescriptor {
        do {
            let reply = try HandshakeClient.exchange(host: host, port: port,
                                                     message: .init(kind: .metadata, json: localDescriptorText),
                                                     timeouts: handshakeTimeouts, maxLength: settings.handshakeMaxLength)
            return try SegmentDescriptor.decode(try JSONValue.parse(reply.json))
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "\(error)")
        }
    }
}
