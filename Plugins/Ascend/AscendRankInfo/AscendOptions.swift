import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// What the ascend plugin reads from probe/create's options, and where an NPU's
// network endpoints come from: pure code, tested without CANN (Tests/AscendPluginTests).

/// Settings from the host's options JSON.
public struct AscendOptions: Equatable, Sendable {
    /// The NPU this engine drives (`device_name` "npu:N", "N", or empty/auto-discovery for 0).
    public var device: Int32 = 0
    /// `MC_ASCEND_LIBRARY`: HIXL's library (default libcann_hixl.so, found through LD_LIBRARY_PATH as CANN's set_env.sh sets it).
    public var hixlLibrary = ""
    /// `MC_ASCEND_ACL_LIBRARY`: the ACL runtime (default libascendcl.so).
    public var aclLibrary = ""
    /// The host address peers reach this engine's HIXL server at (`local_hostname` without a port).
    public var hostIP = "127.0.0.1"
    /// `MC_ASCEND_PORT`: the HIXL server's port (0: a free port the kernel picks).
    public var port: UInt32 = 0
    /// `MC_ASCEND_CONNECT_TIMEOUT_MS`: how long opening a link to a peer may take.
    public var connectTimeoutMs: UInt32 = 3000
    /// `MC_ASCEND_TRANSFER_TIMEOUT_MS`: how long one batch may stay unfinished before it fails and its link is rebuilt.
    public var transferTimeoutMs: UInt64 = 30000
    /// `MC_ASCEND_TRAFFIC_CLASS` and `MC_ASCEND_SERVICE_LEVEL`: RoCE QoS of the links this engine opens.
    public var trafficClass: UInt8 = 0
    public var serviceLevel: UInt8 = 0
    /// `MC_ASCEND_DEVICE_IP`: the NPU's RoCE address when /etc/hccn.conf does not give it.
    public var deviceIP = ""
    /// `MC_ASCEND_HCCN_CONF`: where the NPU addresses are configured (default /etc/hccn.conf).
    public var hccnConf = "/etc/hccn.conf"

    public init() {}

    /// Parses the host's options JSON (nil: the defaults); throws a sentence for the user.
    public init(json: String?) throws(PluginFailure) {
        let raw = try CreateOptions(validating: json)
        let name = raw.deviceName
        if !name.isEmpty && name != "auto-discovery" {
            let digits = name.hasPrefix("npu:") ? String(name.dropFirst(4)) : name
            guard let ordinal = Int32(digits), ordinal >= 0 else {
                throw .invalid("device_name '\(name)' is not an NPU (npu:N or N)")
            }
            device = ordinal
        }
        if let host = AscendOptions.hostPart(of: raw.localHostname), !host.isEmpty { hostIP = host }
        hixlLibrary = raw.setting("MC_ASCEND_LIBRARY") ?? ""
        aclLibrary = raw.setting("MC_ASCEND_ACL_LIBRARY") ?? ""
        deviceIP = raw.setting("MC_ASCEND_DEVICE_IP") ?? ""
        hccnConf = raw.setting("MC_ASCEND_HCCN_CONF") ?? hccnConf
        port = UInt32(try AscendOptions.number(raw, "MC_ASCEND_PORT", 0, 0...65535))
        connectTimeoutMs = UInt32(try AscendOptions.number(raw, "MC_ASCEND_CONNECT_TIMEOUT_MS", 3000, 1...600_000))
        transferTimeoutMs = try AscendOptions.number(raw, "MC_ASCEND_TRANSFER_TIMEOUT_MS", 30000, 1...3_600_000)
        trafficClass = UInt8(try AscendOptions.number(raw, "MC_ASCEND_TRAFFIC_CLASS", 0, 0...255))
        serviceLevel = UInt8(try AscendOptions.number(raw, "MC_ASCEND_SERVICE_LEVEL", 0, 0...7))
        if !deviceIP.isEmpty, IPAddress(deviceIP) == nil { throw .invalid("MC_ASCEND_DEVICE_IP='\(deviceIP)' is not an IP address") }
    }

    private static func number(_ raw: CreateOptions, _ key: String, _ fallback: UInt64, _ range: ClosedRange<UInt64>) throws(PluginFailure) -> UInt64 {
        guard let text = raw.setting(key) else { return fallback }
        guard let value = UInt64(CreateOptions.trimmed(text)), range.contains(value) else {
            throw .invalid("\(key)='\(text)' must be a number in \(range.lowerBound)...\(range.upperBound)")
        }
        return value
    }

    /// "host", "host:port", "[v6]:port" or "v6" → the host part; nil for an unterminated bracket.
    public static func hostPart(of name: String) -> String? {
        if name.hasPrefix("[") {
            guard let close = name.firstIndex(of: "]") else { return nil }
            return String(name[name.index(after: name.startIndex)..<close])
        }
        if name.filter({ $0 == ":" }).count == 1, let colon = name.firstIndex(of: ":") { return String(name[..<colon]) }
        return name
    }
}

/// An IPv4 or IPv6 address in network order.
public struct IPAddress: Equatable, Sendable {
    /// 4 or 16 bytes.
    public let bytes: [UInt8]
    public var isIPv6: Bool { bytes.count == 16 }

    /// Parses dotted IPv4 or textual IPv6; nil for anything else (host names included).
    public init?(_ text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }
}

/// One endpoint of an NPU, as HIXL's EndpointDesc describes it.
public struct AscendEndpoint: Equatable, Sendable {
    /// RoCE over the NPU's own NIC, or HCCS between NPUs of one server.
    public enum Kind: String, Sendable { case roce, hccs }
    public var kind: Kind
    /// The NIC address (RoCE).
    public var address: IPAddress?
    /// The NPU's physical id (HCCS names the device by it).
    public var physicalID: UInt32

    public init(kind: Kind, address: IPAddress?, physicalID: UInt32) {
        self.kind = kind
        self.address = address
        self.physicalID = physicalID
    }

    /// The endpoints an NPU offers: RoCE where its address is known, and HCCS.
    public static func local(physicalID: UInt32, deviceIP: IPAddress?) -> [AscendEndpoint] {
        (deviceIP.map { [AscendEndpoint(kind: .roce, address: $0, physicalID: physicalID)] } ?? [])
            + [AscendEndpoint(kind: .hccs, address: nil, physicalID: physicalID)]
    }
}

/// The NPU NIC addresses of /etc/hccn.conf (`address_N=IPv4`, `IPv6address_N=IPv6`).
public enum HCCNConf {
    /// The address configured for physical NPU `physicalID` in `text` (IPv4 preferred); nil when none is.
    public static func deviceIP(in text: String, physicalID: UInt32) -> IPAddress? {
        var v6: IPAddress?
        for line in text.split(whereSeparator: \.isNewline) {
            let item = CreateOptions.trimmed(line)
            guard let equals = item.firstIndex(of: "=") else { continue }
            let key = CreateOptions.trimmed(item[..<equals]), value = CreateOptions.trimmed(item[item.index(after: equals)...])
            if key == "address_\(physicalID)", let ip = IPAddress(value), !ip.isIPv6 { return ip }
            if key == "IPv6address_\(physicalID)", let ip = IPAddress(value), ip.isIPv6, v6 == nil { v6 = ip }
        }
        return v6
    }

    /// Reads `path` (at most 1 MiB); nil when it cannot be read.
    public static func read(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < 1 << 20 {
            let n = fread(&chunk, 1, chunk.count, file)
            if n <= 0 { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
