import CEFAShim
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What create/probe receive, and the settings the plugin derives from it.
struct EFAOptions {
    /// The libfabric provider: `MC_EFA_PROVIDER`, else `FI_PROVIDER`, else `efa`.
    var provider: String
    /// Source address for IP-based providers (`MC_EFA_NODE`, else `MC_TCP_BIND_ADDRESS` when it names
    /// one address, else local_hostname when it is an IP literal), as the engine binds its listeners.
    var node: String?
    /// Requested devices; nil means every domain the provider offers (empty or `auto-discovery`).
    var devices: [String]?
    /// This engine's segment name (for NIC paths in handshakes).
    var segmentName: String
    /// Pieces larger than this are split (`MC_EFA_SLICE_SIZE`; 0 = only at the provider's max message size).
    var sliceSize: UInt64
    /// Operations in flight per device (`MC_EFA_MAX_OUTSTANDING`, capped by the provider's transmit depth).
    var maxOutstanding: Int
    /// How long a progress thread polls after activity before it sleeps (`MC_EFA_SPIN_US`, 20).
    var spinNanoseconds: UInt64
    /// Peer addresses kept in each device's address vector (`MC_EFA_MAX_ADDRESSES`, 4096); past it the
    /// oldest one no open peer uses is removed.
    var maxAddresses: Int
    /// An operation not completed after this long fails with TE_ERR_TIMEOUT (`MC_EFA_TIMEOUT_MS`, 30 s; 0 = never).
    var timeoutNanoseconds: UInt64

    init(json: String?) {
        let raw = CreateOptions(json: json)
        // MC_* settings come from the host's environment (passed in "options"); FI_PROVIDER is
        // libfabric's own variable, which libfabric reads from the process environment too.
        let setting = raw.setting
        let libfabricProvider = getenv("FI_PROVIDER").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
        let provider = setting("MC_EFA_PROVIDER") ?? libfabricProvider ?? "efa"
        self.provider = provider
        let ipBased = ["tcp", "sockets", "udp", "verbs"].contains { provider.contains($0) }
        if let explicit = setting("MC_EFA_NODE") {
            node = explicit
        } else if ipBased, let bind = setting("MC_TCP_BIND_ADDRESS"), EFAOptions.isIPLiteral(bind), !["0.0.0.0", "::"].contains(bind) {
            // The engine's listeners bind here (before local_hostname, as the engine decides), so
            // peers reach both over the same interface; with a metadata server local_hostname
            // is often a name, not an address.
            node = bind
        } else if ipBased, case let host = EFAOptions.hostPart(raw.localHostname), EFAOptions.isIPLiteral(host) {
            node = host
        } else {
            node = nil
        }
        devices = raw.requestedDevices
        segmentName = raw.segmentName
        sliceSize = setting("MC_EFA_SLICE_SIZE").flatMap { UInt64($0) } ?? 0
        maxOutstanding = setting("MC_EFA_MAX_OUTSTANDING").flatMap { Int($0) }.map { max(1, $0) } ?? 256
        timeoutNanoseconds = (setting("MC_EFA_TIMEOUT_MS").flatMap { UInt64($0) } ?? 30_000) * 1_000_000
        spinNanoseconds = (setting("MC_EFA_SPIN_US").flatMap { UInt64($0) } ?? 20) * 1000
        maxAddresses = setting("MC_EFA_MAX_ADDRESSES").flatMap { Int($0) }.map { min(max(2, $0), 1 << 20) } ?? 4096
    }

    /// "host:port" or "[v6]:port" -> host.
    static func hostPart(_ text: String) -> String {
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            return String(text[text.index(after: text.startIndex)..<close])
        }
        let colons = text.filter { $0 == ":" }.count
        if colons == 1, let colon = text.firstIndex(of: ":") { return String(text[..<colon]) }
        return text
    }

    static func isIPLiteral(_ text: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, text, &v4) == 1 || inet_pton(AF_INET6, text, &v6) == 1
    }

    /// The device name for a libfabric domain: EFA names RDM domains `<device>-rdm`.
    static func deviceName(domain: String) -> String {
        for suffix in ["-rdm", "-dgrm"] where domain.hasSuffix(suffix) { return String(domain.dropLast(suffix.count)) }
        return domain
    }

    /// The domains to open: all of them, or the requested ones (unknown names reported in `missing`).
    func choose(from available: [efa_domain_info]) -> (chosen: [efa_domain_info], missing: [String]) {
        guard let devices else { return (available, []) }
        var chosen: [efa_domain_info] = [], missing: [String] = []
        for wanted in devices {
            if let match = available.first(where: { EFAOptions.deviceName(domain: $0.domainName) == wanted || $0.domainName == wanted }) {
                chosen.append(match)
            } else {
                missing.append(wanted)
            }
        }
        return (chosen, missing)
    }

    /// Lists the provider's RDM+RMA domains, or the libfabric error code.
    func listDomains() -> Result<[efa_domain_info], LibfabricError> {
        var entries = [efa_domain_info](repeating: efa_domain_info(), count: 64)
        let count = entries.withUnsafeMutableBufferPointer { buffer in
            efa_list_domains(provider, node, buffer.baseAddress, buffer.count)
        }
        guard count >= 0 else { return .failure(LibfabricError(code: count)) }
        return .success(Array(entries.prefix(min(Int(count), entries.count))))
    }
}

/// A libfabric error code with its text.
struct LibfabricError: Error, CustomStringConvertible {
    var code: Int32
    var description: String { "\(String(cString: efa_strerror(code))) (\(code))" }
}

extension efa_domain_info {
    private static func text<T>(_ tuple: T) -> String {
        withUnsafeBytes(of: tuple) { raw in String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self) }
    }
    var domainName: String { Self.text(domain) }
    var providerName: String { Self.text(provider) }
    var fabricName: String { Self.text(fabric) }
}
