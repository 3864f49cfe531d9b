import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An NVMe-oF subsystem address: `tcp://127.0.0.1:4420/nqn.2026-11.io.example:kv?nsid=1&host_traddr=10.0.0.2`.
struct FabricTarget: Equatable, Codable {
    var trtype: String
    var traddr: String
    var trsvcid: String
    var nqn: String
    /// Only this namespace of the subsystem (nil: every namespace).
    var nsid: UInt32?
    /// Local address to connect from (libnvme's host_traddr).
    var hostTraddr: String?

    static let transports: Set<String> = ["tcp", "rdma", "fc", "loop"]

    /// Parses the URI form; nil when `text` is not one.
    static func parse(_ text: String) throws -> FabricTarget? {
        guard let schemeEnd = text.firstRange(of: "://") else { return nil }
        let trtype = String(text[..<schemeEnd.lowerBound]).lowercased()
        guard transports.contains(trtype) else {
            throw OptionError("'\(text)': unknown NVMe-oF transport '\(trtype)' (tcp, rdma, fc or loop)")
        }
        var rest = String(text[schemeEnd.upperBound...])
        var query: [String: String] = [:]
        if let mark = rest.firstIndex(of: "?") {
            for pair in rest[rest.index(after: mark)...].split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                query[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
            }
            rest = String(rest[..<mark])
        }
        guard let slash = rest.firstIndex(of: "/"), rest.index(after: slash) < rest.endIndex else {
            throw OptionError("'\(text)': expected \(trtype)://address:port/<subsystem NQN>")
        }
        let hostPort = String(rest[..<slash])
        let nqn = String(rest[rest.index(after: slash)...])
        var address = hostPort
        var service = trtype == "rdma" || trtype == "tcp" ? "4420" : ""
        // [v6addr]:port, v4addr:port, or a bare address (port 4420).
        if hostPort.hasPrefix("["), let close = hostPort.firstIndex(of: "]") {
            address = String(hostPort[hostPort.index(after: hostPort.startIndex)..<close])
            let tail = hostPort[hostPort.index(after: close)...]
            if tail.hasPrefix(":") { service = String(tail.dropFirst()) }
        } else if let colon = hostPort.lastIndex(of: ":") {
            address = String(hostPort[..<colon])
            service = String(hostPort[hostPort.index(after: colon)...])
        }
        guard !address.isEmpty, !nqn.isEmpty, service.isEmpty || UInt16(service) != nil else {
            throw OptionError("'\(text)': expected \(trtype)://address:port/<subsystem NQN>")
        }
        var nsid: UInt32?
        if let value = query["nsid"] {
            guard let n = UInt32(value), n > 0 else { throw OptionError("'\(text)': nsid must be a positive number") }
            nsid = n
        }
        return FabricTarget(trtype: trtype, traddr: address, trsvcid: service, nqn: nqn, nsid: nsid,
                            hostTraddr: query["host_traddr"].flatMap { $0.isEmpty ? nil : $0 })
    }

    var uri: String { "\(trtype)://\(traddr):\(trsvcid)/\(nqn)" }
}

/// A malformed option, with the words the user sees.
struct OptionError: Error, CustomStringConvertible {
    let description: String
    init(_ text: String) { description = text }
}

/// Settings from create/probe's options.
struct NVMeoFOptions {
    /// One storage source this engine owns: a local path (block device or file) or a fabric subsystem.
    enum Source: Equatable {
        case path(String)
        case fabric(FabricTarget)
    }

    /// `MC_NVMEOF_NAMESPACES`, else `device_name`: comma-separated sources this engine serves.
    var sources: [Source] = []
    /// `MC_NVMEOF_DISCOVERY`: discovery controllers (`tcp://addr:port`) whose subsystems are all connected.
    var discovery: [FabricTarget] = []
    /// `MC_NVMEOF_DIRECT` (default on): reach a peer's namespaces directly when this host sees them.
    var direct = true
    /// `MC_NVMEOF_CONNECT` (default on): connect to a peer's subsystem to reach it directly.
    var connect = true
    /// `MC_NVMEOF_O_DIRECT` (default on): bypass the page cache.
    var oDirect = true
    /// `MC_NVMEOF_WORKERS` (default 4): I/O threads.
    var workers = 4
    /// `MC_NVMEOF_IO_SIZE` (default 1 MiB): requests are cut into pieces of this size.
    var ioSize: UInt64 = 1 << 20
    /// `MC_NVMEOF_RELAY_CHUNK` (default 256 KiB): bytes per relayed message through the owner.
    var relayChunk: UInt64 = 256 << 10
    /// local_hostname, for upstream's `local_path_map`.
    var hostname = ""
    /// The segment name (P2P `host:port`).
    var segment = ""

    init() {}

    init(json: String?) throws {
        guard let json else { return }
        let raw: CreateOptions
        do { raw = try CreateOptions(validating: json) } catch { throw OptionError(error.message) }
        let options = raw.settings
        hostname = raw.localHostname
        segment = raw.segmentName
        var list = options["MC_NVMEOF_NAMESPACES"] ?? ""
        if list.isEmpty, raw.deviceName != "auto-discovery" { list = raw.deviceName }
        for item in CreateOptions.list(list) {
            if let target = try FabricTarget.parse(item) {
                sources.append(.fabric(target))
            } else if item.hasPrefix("/") {
                sources.append(.path(item))
            } else {
                throw OptionError("'\(item)': a namespace is a path (/dev/nvme1n1, /srv/kv.img) or tcp|rdma://address:port/<NQN>")
            }
        }
        for item in (options["MC_NVMEOF_DISCOVERY"] ?? "").split(separator: ",") where !item.isEmpty {
            // A discovery address needs no NQN: accept tcp://addr:port and fill in the discovery NQN.
            let text = CreateOptions.trimmed(item)
            let withNQN = text.dropFirst(text.firstRange(of: "://").map { text.distance(from: text.startIndex, to: $0.upperBound) } ?? 0).contains("/")
                ? text : text + "/nqn.2014-08.org.nvmexpress.discovery"
            guard let target = try FabricTarget.parse(withNQN) else {
                throw OptionError("MC_NVMEOF_DISCOVERY '\(text)': expected tcp|rdma://address:port")
            }
            discovery.append(target)
        }
        func flag(_ name: String, _ fallback: Bool) throws -> Bool {
            guard let value = options[name]?.lowercased(), !value.isEmpty else { return fallback }
            if ["1", "true", "yes", "on"].contains(value) { return true }
            if ["0", "false", "no", "off"].contains(value) { return false }
            throw OptionError("\(name)='\(value)' is not a boolean")
        }
        func number(_ name: String, _ range: ClosedRange<UInt64>) throws -> UInt64? {
            guard let value = options[name], !value.isEmpty else { return nil }
            guard let n = UInt64(value), range.contains(n) else { throw OptionError("\(name)='\(value)' must be a number in \(range)") }
            return n
        }
        direct = try flag("MC_NVMEOF_DIRECT", true)
        connect = try flag("MC_NVMEOF_CONNECT", true)
        oDirect = try flag("MC_NVMEOF_O_DIRECT", true)
        workers = Int(try number("MC_NVMEOF_WORKERS", 1...64) ?? 4)
        ioSize = try number("MC_NVMEOF_IO_SIZE", 4096...(64 << 20)) ?? ioSize
        relayChunk = try number("MC_NVMEOF_RELAY_CHUNK", 4096...(512 << 10)) ?? relayChunk
    }
}
