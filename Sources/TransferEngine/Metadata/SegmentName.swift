/// Host and port parsed from a segment name or `local_hostname`, as upstream:
/// split at the last ':', `[v6]:port` or a bare address; no port = nil.
public struct HostPort: Equatable, Sendable, CustomStringConvertible {
    /// Host name or address (IPv6 without brackets).
    public var host: String
    /// Port, if one was given.
    public var port: UInt16?

    /// Creates a host/port pair.
    public init(host: String, port: UInt16?) {
        self.host = host
        self.port = port
    }

    /// Parses `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address.
    public static func parse(_ text: String) throws -> HostPort {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty else { throw EngineError.invalidArgument("empty host name") }
        if trimmed.hasPrefix("[") {
            guard let close = trimmed.firstIndex(of: "]") else { throw EngineError.invalidArgument("unterminated '[' in '\(text)'") }
            let host = String(trimmed[trimmed.index(after: trimmed.startIndex)..<close])
            let rest = trimmed[trimmed.index(after: close)...]
            if rest.isEmpty { return HostPort(host: host, port: nil) }
            guard rest.hasPrefix(":"), let port = UInt16(rest.dropFirst()), port != 0 else {
                throw EngineError.invalidArgument("bad port in '\(text)'")
            }
            return HostPort(host: host, port: port)
        }
        let colons = trimmed.filter { $0 == ":" }.count
        if colons > 1 { return HostPort(host: trimmed, port: nil) }  // bare IPv6
        if colons == 1 {
            let parts = trimmed.split(separator: ":", omittingEmptySubsequences: false)
            guard !parts[0].isEmpty else { throw EngineError.invalidArgument("missing host in '\(text)'") }
            guard let port = UInt16(parts[1]), port != 0 else { throw EngineError.invalidArgument("bad port in '\(text)'") }
            return HostPort(host: String(parts[0]), port: port)
        }
        return HostPort(host: trimmed, port: nil)
    }

    /// `host:port` with IPv6 hosts in brackets (the P2P segment name form).
    public var description: String {
        let shownHost = host.contains(":") ? "[\(host)]" : host
        if let port { return "\(shownHost):\(port)" }
        return shownHost
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: CharacterSetLite) -> String {
        var slice = Substring(self)
        while let first = slice.first, set.contains(first) { slice.removeFirst() }
        while let last = slice.last, set.contains(last) { slice.removeLast() }
        return String(slice)
    }
}

/// The few character classes the engine trims (keeps Foundation out of the library).
struct CharacterSetLite: Sendable {
    let contains: @Sendable (Character) -> Bool
    static let whitespaces = CharacterSetLite { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
    func contains(_ c: Character) -> Bool { contains(c) }
}
