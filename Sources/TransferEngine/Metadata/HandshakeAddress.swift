/// Finds the handshake (RPC) port of a named segment, the one rule every handshake-port use
/// follows (descriptor fetch, probe, notify, plugin handshakes): in P2P mode the segment name is
/// `host:rpc_port`; with a metadata server the name is only a key, and the address is the peer's
/// published `rpc_meta` entry (`{"ip_or_host_name", "rpc_port"}`).
struct HandshakeAddressResolver: Sendable {
    /// The metadata server, or nil in P2P mode.
    let store: MetadataStore?
    let keys: MetadataKeys
    /// Total time for one lookup, retries included (MC_METADATA_TIMEOUT_MS).
    let budgetMs: Int

    /// The handshake address of `name`; throws `segmentUnavailable` naming the server and key.
    func resolve(_ name: String) throws -> (host: String, port: UInt16) {
        guard let store else {
            let target = try HostPort.parse(name)
            guard let port = target.port else {
                throw EngineError.segmentUnavailable(name: name, reason: "P2P segment names are host:rpc_port")
            }
            return (target.host, port)
        }
        do {
            return try withRetries(budgetMs: budgetMs) {
                guard let text = try store.get(keys.rpcMeta(name)) else {
                    throw MetadataRejection(description: "no key '\(keys.rpcMeta(name))' on \(store.serverDescription)")
                }
                return try Self.decodeRPCMeta(text, segment: name)
            }
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "\(error)")
        }
    }

    /// Parses an `rpc_meta` value; anything malformed is refused, never trusted.
    static func decodeRPCMeta(_ text: String, segment name: String) throws -> (host: String, port: UInt16) {
        let rpc = try? JSONValue.parse(text)
        guard let host = rpc?["ip_or_host_name"]?.stringValue, !host.isEmpty,
              let port = rpc?["rpc_port"]?.uint64Value, port > 0, port <= 65535 else {
            throw MetadataRejection(description: "malformed rpc_meta for '\(name)': \(text.prefix(200))")
        }
        return (host, UInt16(port))
    }
}
