import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The segment descriptor's `rank_info`, in upstream's shape (Mooncake's
// transfer_metadata.cpp, protocol "ascend"): hostIp/hostPort and `endpoints`
// ("ip:port") name the engine's HIXL server, deviceIp and devicePhyId the NPU.
// A peer's descriptor is its word, never trusted: every number is range-checked.

/// What this engine publishes about itself.
public struct LocalRankInfo: Equatable, Sendable {
    public var hostIP: String
    public var port: UInt32
    public var logicalID: Int32
    public var physicalID: UInt32
    public var deviceIP: IPAddress?
    public var pid: Int32

    public init(hostIP: String, port: UInt32, logicalID: Int32, physicalID: UInt32, deviceIP: IPAddress?, pid: Int32) {
        self.hostIP = hostIP
        self.port = port
        self.logicalID = logicalID
        self.physicalID = physicalID
        self.deviceIP = deviceIP
        self.pid = pid
    }

    /// The descriptor fragment: `{"rank_info": {...}}`.
    public var json: String {
        let server = hostIP.contains(":") ? "[\(hostIP)]:\(port)" : "\(hostIP):\(port)"
        let device = deviceIP.map { AscendPeer.text(of: $0) } ?? ""
        return "{\"rank_info\":{\"rankId\":0,\"hostIp\":\(JSONFragment.string(hostIP)),\"hostPort\":\(port),"
            + "\"deviceLogicId\":\(logicalID),\"devicePhyId\":\(physicalID),\"deviceType\":0,"
            + "\"deviceIp\":\(JSONFragment.string(device)),\"devicePort\":0,\"pid\":\(pid),"
            + "\"endpoints\":[\(JSONFragment.string(server))]}}"
    }
}

/// A peer's HIXL server and NPU, read from its descriptor.
public struct AscendPeer: Equatable, Sendable {
    /// Where its HIXL server listens.
    public var serverIP: String
    public var serverPort: UInt32
    /// Its NPU's endpoints (RoCE where it published an address, HCCS always).
    public var endpoints: [AscendEndpoint]
    /// Its host IP: HCCS only joins NPUs of one server.
    public var hostIP: String

    private struct Raw: Decodable {
        struct Rank: Decodable {
            var hostIp: String?
            var hostPort: UInt64?
            var devicePhyId: UInt64?
            var deviceIp: String?
            var endpoints: [String]?
        }
        var rank_info: Rank?
    }

    /// Parses the parts of a descriptor this transport needs; throws a sentence naming what is wrong.
    public init(json: String) throws(PluginFailure) {
        guard let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else {
            throw .invalid("malformed segment descriptor (rank_info must be an object of upstream's field types)")
        }
        guard let rank = raw.rank_info else { throw .rejected("the peer publishes no rank_info: it is not an ascend segment") }
        guard let phy = rank.devicePhyId, phy <= UInt64(UInt32.max) else { throw .rejected("rank_info.devicePhyId is missing or too large") }
        hostIP = rank.hostIp ?? ""
        // The first "ip:port" endpoint names the server (upstream: the ADXL engine of the peer's NPU).
        if let first = rank.endpoints?.first {
            guard let (ip, port) = AscendPeer.split(first) else { throw .rejected("rank_info.endpoints[0] '\(first.prefix(80))' is not ip:port") }
            (serverIP, serverPort) = (ip, port)
        } else {
            guard let port = rank.hostPort, (1...65535).contains(port), IPAddress(hostIP) != nil else {
                throw .rejected("rank_info names no HIXL server (no endpoints, and hostIp/hostPort are not an address and port)")
            }
            (serverIP, serverPort) = (hostIP, UInt32(port))
        }
        var deviceAddress: IPAddress?
        if let text = rank.deviceIp, !text.isEmpty {
            guard let ip = IPAddress(text) else { throw .rejected("rank_info.deviceIp '\(text.prefix(80))' is not an IP address") }
            deviceAddress = ip
        }
        endpoints = AscendEndpoint.local(physicalID: UInt32(phy), deviceIP: deviceAddress)
    }

    /// "a.b.c.d:port" or "[v6]:port" → (ip, port); nil unless both parse.
    public static func split(_ text: String) -> (String, UInt32)? {
        guard text.utf8.count <= 64, let colon = text.lastIndex(of: ":") else { return nil }
        var ip = String(text[..<colon])
        if ip.hasPrefix("[") && ip.hasSuffix("]") { ip = String(ip.dropFirst().dropLast()) }
        guard IPAddress(ip) != nil, let port = UInt32(text[text.index(after: colon)...]), (1...65535).contains(port) else { return nil }
        return (ip, port)
    }

    /// Which local endpoint talks to which of the peer's: HCCS between NPUs of one host, else RoCE.
    public func pair(with local: [AscendEndpoint], localHostIP: String) -> (local: AscendEndpoint, remote: AscendEndpoint)? {
        if hostIP == localHostIP, let l = local.first(where: { $0.kind == .hccs }), let r = endpoints.first(where: { $0.kind == .hccs }) {
            return (l, r)
        }
        if let l = local.first(where: { $0.kind == .roce }), let r = endpoints.first(where: { $0.kind == .roce }), l.address?.isIPv6 == r.address?.isIPv6 {
            return (l, r)
        }
        return nil
    }

    /// Text form of an address.
    public static func text(of address: IPAddress) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        let family = address.isIPv6 ? AF_INET6 : AF_INET
        _ = address.bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &buffer, socklen_t(buffer.count)) }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
