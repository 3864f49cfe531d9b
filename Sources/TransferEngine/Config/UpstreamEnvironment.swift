/// Upstream's environment names that users already set and that this engine reads differently:
/// each takes effect here or is reported once, saying why it is ignored (README: "Upstream
/// environment names").
enum UpstreamEnvironment {
    /// What the names change, and the lines to log once (warnings for ignored names).
    struct Effect {
        var configuration: EngineConfiguration
        var notices: [String] = []
        var warnings: [String] = []
    }

    /// Names that are reported as ignored, with the reason.
    static let ignored: [(name: String, reason: String)] = [
        ("MC_FORCE_HCA", "this engine installs exactly the protocols named in protocol / MOONCAKE_PROTOCOL (name rdma to run it; "
            + "missing hardware is one warning, MC_STRICT_PROTOCOL=1 makes it an error)"),
        ("MC_CUSTOM_TOPO_JSON", "the rdma and efa plugins compute the NIC priority matrix from sysfs; a matrix from a file is not supported yet"),
        ("MC_IB_PORT", "the rdma plugin uses each device's first ACTIVE port"),
        ("MC_HANDSHAKE_PORT", "upstream reads it only with MC_LEGACY_RPC_PORT_BINDING; here the handshake port is the one written in "
            + "local_hostname when free (the C API's rpc_port: exactly that one), else random in MC_MIN_RPC_PORT..MC_MAX_RPC_PORT"),
        ("MC_USE_IPV6", "not needed: an IPv6 local_hostname (::1, [fe80::1]:12345, a name resolving to IPv6) makes the listeners IPv6"),
    ]

    /// Applies the names that take effect (MC_FORCE_TCP) and collects the lines to log.
    static func apply(_ configuration: EngineConfiguration, environment: [String: String]) -> Effect {
        var effect = Effect(configuration: configuration)
        if ProtocolSelector.truthy(environment["MC_FORCE_TCP"]) {
            let requested = configuration.protocolName
            effect.configuration.protocolName = "tcp"
            if ProtocolSelector.parseList(requested).names != ["tcp"] {
                effect.notices.append("MC_FORCE_TCP is set: only tcp runs (protocol '\(requested)' is not installed)")
            }
        }
        if ProtocolSelector.truthy(environment["MC_DISABLE_METACACHE"]) {
            effect.notices.append("MC_DISABLE_METACACHE is set: openSegment fetches the descriptor again each time")
        }
        for (name, reason) in ignored where !(environment[name] ?? "").isEmpty {
            effect.warnings.append("\(name) is ignored: \(reason)")
        }
        return effect
    }
}
