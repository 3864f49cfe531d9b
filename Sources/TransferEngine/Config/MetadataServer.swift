/// The metadata service named by `metadata_server`.
public enum MetadataServer: Equatable, Sendable {
    /// No server: peers exchange descriptors over the handshake port.
    case p2pHandshake
    /// etcd endpoints (`etcd://h:p[,h:p]` or a bare `h:p`).
    case etcd([String])
    /// A redis server (`redis://h:p`).
    case redis(String)
    /// An HTTP metadata server URL (`http://h:p/path`, `https://...`).
    case http(String)

    /// The accepted forms, for error messages.
    public static let acceptedForms = "P2PHANDSHAKE, etcd://host:port[,host:port...], host:port (etcd), redis://host:port, http://host:port/path, https://host:port/path"

    /// Parses the official engine's `metadata_server` forms.
    public static func parse(_ text: String) throws -> MetadataServer {
        let value = text.trimmingCharacters(in: .whitespaces)
        if value == "P2PHANDSHAKE" { return .p2pHandshake }
        if value.lowercased().hasPrefix("etcd://") {
            let endpoints = value.dropFirst(7).split(separator: ",").map(String.init)
            guard !endpoints.isEmpty, endpoints.allSatisfy({ (try? HostPort.parse($0))?.port != nil }) else {
                throw EngineError.invalidMetadataServer("'\(text)': etcd endpoints must be host:port; accepted forms: \(acceptedForms)")
            }
            return .etcd(endpoints)
        }
        if value.lowercased().hasPrefix("redis://") {
            guard (try? HostPort.parse(String(value.dropFirst(8))))?.port != nil else {
                throw EngineError.invalidMetadataServer("'\(text)': expected redis://host:port; accepted forms: \(acceptedForms)")
            }
            return .redis(String(value.dropFirst(8)))
        }
        if value.lowercased().hasPrefix("http://") || value.lowercased().hasPrefix("https://") { return .http(value) }
        if !value.contains("://"), !value.isEmpty, value.split(separator: ",").allSatisfy({ (try? HostPort.parse(String($0)))?.port != nil }) {
            return .etcd(value.split(separator: ",").map(String.init))
        }
        throw EngineError.invalidMetadataServer("'\(text)' is not a recognised form; accepted forms: \(acceptedForms)")
    }
}

extension MetadataServer {
    /// Where the server listens (the first etcd endpoint), for choosing the local address that
    /// reaches it; nil in P2P mode.
    var endpoint: HostPort? {
        switch self {
        case .p2pHandshake: return nil
        case .etcd(let endpoints): return endpoints.first.flatMap { try? HostPort.parse($0) }
        case .redis(let address): return try? HostPort.parse(address)
        case .http(let url):
            let rest = url.drop { $0 != "/" }.drop { $0 == "/" }
            guard var endpoint = try? HostPort.parse(String(rest.prefix { $0 != "/" && $0 != "?" })) else { return nil }
            if endpoint.port == nil { endpoint.port = url.lowercased().hasPrefix("https") ? 443 : 80 }
            return endpoint
        }
    }

    /// The backend's name (the metrics' label): p2p, etcd, redis or http.
    var backend: String {
        switch self {
        case .p2pHandshake: return "p2p"
        case .etcd: return "etcd"
        case .redis: return "redis"
        case .http: return "http"
        }
    }
}
