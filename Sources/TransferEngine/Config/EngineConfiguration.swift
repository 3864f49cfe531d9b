import FoundationEssentials

/// Everything needed to start an engine, resolved from (highest first):
/// explicit arguments (`initialize(...)`, CLI flags), environment variables,
/// the JSON config file (`--config` or `MOONCAKE_CONFIG_PATH`), defaults.
public struct EngineConfiguration: Sendable, Equatable {
    /// Host name or address this engine is reached at; listeners bind to it.
    public var localHostname: String
    /// `P2PHANDSHAKE`, `etcd://...`, `redis://...`, `http://...`.
    public var metadataServer: String
    /// Requested protocol (`tcp`, `rdma`, ...).
    public var protocolName: String
    /// Device list (comma-separated) or `auto-discovery`; empty = plugin default.
    public var deviceName: String
    /// Mooncake Store master address (kept for Store clients; unused by the engine).
    public var masterServerAddress: String?
    /// Mooncake Store global segment size in bytes.
    public var globalSegmentSize: UInt64
    /// Mooncake Store local buffer size in bytes.
    public var localBufferSize: UInt64
    /// Shared secret that turns peer authentication on (config key `auth_secret`; MC_AUTH_SECRET
    /// and MC_AUTH_SECRET_FILE take precedence). Nil: off, as upstream.
    public var authSecret: String? = nil
    /// The handshake (rpc) port, required: starting fails when it is taken (the C API's
    /// `rpc_port`). Nil: a port written in `localHostname` when free, else a random one.
    public var rpcPort: UInt16? = nil
    /// The address peers reach this engine at, when not `localHostname`'s host (the C API's
    /// `ip_or_host_name`): listeners bind to it (unless MC_TCP_BIND_ADDRESS), the P2P segment
    /// name and the published rpc_meta carry it.
    public var advertisedHost: String? = nil

    /// Defaults: loopback host, P2PHANDSHAKE, TCP, upstream's Store sizes.
    public init(localHostname: String = "127.0.0.1", metadataServer: String = "P2PHANDSHAKE", protocolName: String = "tcp",
                deviceName: String = "", masterServerAddress: String? = nil,
                globalSegmentSize: UInt64 = 3_355_443_200, localBufferSize: UInt64 = 1_073_741_824) {
        self.localHostname = localHostname
        self.metadataServer = metadataServer
        self.protocolName = protocolName
        self.deviceName = deviceName
        self.masterServerAddress = masterServerAddress
        self.globalSegmentSize = globalSegmentSize
        self.localBufferSize = localBufferSize
    }

    /// Values given explicitly by the caller; nil = not given.
    public struct Overrides: Sendable, Equatable {
        /// `local_hostname` given by the caller.
        public var localHostname: String?
        /// `metadata_server` given by the caller.
        public var metadataServer: String?
        /// `protocol` given by the caller.
        public var protocolName: String?
        /// `device_name` given by the caller (an empty string counts as given).
        public var deviceName: String?
        /// Config file path (overrides MOONCAKE_CONFIG_PATH).
        public var configPath: String?

        /// Creates overrides.
        public init(localHostname: String? = nil, metadataServer: String? = nil, protocolName: String? = nil,
                    deviceName: String? = nil, configPath: String? = nil) {
            self.localHostname = localHostname
            self.metadataServer = metadataServer
            self.protocolName = protocolName
            self.deviceName = deviceName
            self.configPath = configPath
        }
    }

    /// Config-file keys the engine uses.
    static let fileKeys: Set<String> = [
        "local_hostname", "metadata_server", "protocol", "device_name", "master_server_address",
        "global_segment_size", "local_buffer_size", "auth_secret",
    ]
    /// Keys of upstream's Store/vLLM configs that are accepted silently.
    static let toleratedKeys: Set<String> = [
        "enable_ssd_offload", "ssd_offload_path", "tenant_id", "enable_client_http_server", "client_http_port",
        "metadata_backend", "prefill_url", "decode_url",
    ]

    /// Resolves a configuration; `warnings` lists what was ignored (unknown keys).
    public static func resolve(_ overrides: Overrides = Overrides(), environment: [String: String])
        throws -> (configuration: EngineConfiguration, warnings: [String]) {
        var configuration = EngineConfiguration()
        var warnings: [String] = []

        if let path = overrides.configPath ?? environment["MOONCAKE_CONFIG_PATH"].flatMap({ $0.isEmpty ? nil : $0 }) {
            warnings += try configuration.apply(configFile: path)
        }
        func env(_ name: String) -> String? {
            guard let value = environment[name], !value.isEmpty else { return nil }
            return value
        }
        if let v = env("MOONCAKE_LOCAL_HOSTNAME") { configuration.localHostname = v }
        if let v = env("MOONCAKE_TE_META_DATA_SERVER") { configuration.metadataServer = v }
        if let v = env("MOONCAKE_PROTOCOL") { configuration.protocolName = v }
        if let v = env("MOONCAKE_DEVICE") { configuration.deviceName = v }
        if let v = env("MOONCAKE_MASTER") { configuration.masterServerAddress = v }
        if let v = env("MOONCAKE_GLOBAL_SEGMENT_SIZE") {
            configuration.globalSegmentSize = try sized(v, "MOONCAKE_GLOBAL_SEGMENT_SIZE")
        }
        if let v = env("MOONCAKE_LOCAL_BUFFER_SIZE") {
            configuration.localBufferSize = try sized(v, "MOONCAKE_LOCAL_BUFFER_SIZE")
        }
        if let v = overrides.localHostname, !v.isEmpty { configuration.localHostname = v }
        if let v = overrides.metadataServer, !v.isEmpty { configuration.metadataServer = v }
        if let v = overrides.protocolName, !v.isEmpty { configuration.protocolName = v }
        if let v = overrides.deviceName { configuration.deviceName = v }
        configuration.protocolName = configuration.protocolName.trimmingCharacters(in: .whitespaces).lowercased()
        // Empty is allowed with a metadata server: the engine picks the address that routes to it.
        guard !configuration.localHostname.trimmingCharacters(in: .whitespaces).isEmpty
                || (try? MetadataServer.parse(configuration.metadataServer)).map({ $0 != .p2pHandshake }) == true else {
            throw EngineError.invalidConfiguration("local_hostname is empty (with P2PHANDSHAKE it names this host: give an address peers reach)")
        }
        return (configuration, warnings)
    }

    private static func sized(_ text: String, _ source: String) throws -> UInt64 {
        do { return try ByteSize.parse(text) } catch let error as EngineError {
            throw EngineError.invalidConfiguration("\(source): \(error.description.replacingPrefix("invalid configuration: ", with: ""))")
        }
    }

    /// Applies a JSON config file; returns warnings for unknown keys.
    mutating func apply(configFile path: String) throws -> [String] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw EngineError.invalidConfiguration("cannot read config file '\(path)'")
        }
        let root: JSONValue
        do { root = try JSONValue.parse(Array(data)) } catch {
            throw EngineError.invalidConfiguration("config file '\(path)': \(error)")
        }
        guard let object = root.objectValue else {
            throw EngineError.invalidConfiguration("config file '\(path)': the top level must be a JSON object")
        }
        var warnings: [String] = []
        for key in object.keys.sorted() where !Self.fileKeys.contains(key) && !Self.toleratedKeys.contains(key) {
            warnings.append("config file '\(path)': unknown key '\(key)' ignored (known keys: \(Self.fileKeys.sorted().joined(separator: ", ")))")
        }
        func string(_ key: String) throws -> String? {
            guard let value = object[key] else { return nil }
            guard let text = value.stringValue else {
                throw EngineError.invalidConfiguration("config file '\(path)': '\(key)' must be a string, got \(value)")
            }
            return text
        }
        func size(_ key: String) throws -> UInt64? {
            guard let value = object[key] else { return nil }
            if let number = value.uint64Value { return number }
            if let text = value.stringValue { return try Self.sized(text, "config file '\(path)': '\(key)'") }
            throw EngineError.invalidConfiguration("config file '\(path)': '\(key)' must be a size such as 1073741824 or \"1 GiB\", got \(value)")
        }
        if let v = try string("local_hostname") { localHostname = v }
        if let v = try string("metadata_server") { metadataServer = v }
        if let v = try string("protocol") { protocolName = v }
        if let v = try string("device_name") { deviceName = v }
        if let v = try string("master_server_address") { masterServerAddress = v }
        if let v = try size("global_segment_size") { globalSegmentSize = v }
        if let v = try size("local_buffer_size") { localBufferSize = v }
        if let v = try string("auth_secret") { authSecret = v }
        return warnings
    }
}

extension String {
    func replacingPrefix(_ prefix: String, with replacement: String) -> String {
        hasPrefix(prefix) ? replacement + dropFirst(prefix.count) : self
    }
}
