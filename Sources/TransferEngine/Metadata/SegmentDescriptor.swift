import FoundationEssentials

/// The segment descriptor JSON that engines publish and exchange.
///
/// Field names and types follow the official engine so either side can
/// decode the other's descriptor: `name`, `protocol`, `tcp_data_port`,
/// `tcp_proto_version`, `timestamp`, `buffers[{name, addr, length}]`.
/// Keys added by a transport plugin (devices, rkeys, priority matrix) ride in
/// `extra` and in each buffer's `extra`.
public struct SegmentDescriptor: Equatable, Sendable {
    /// One registered buffer.
    public struct Buffer: Equatable, Sendable {
        /// For tcp: the segment name; for rdma-like plugins: the memory location.
        public var name: String {
            didSet { hostAccessible = MemoryLocation.isHostAccessible(name) }
        }
        /// Whether `name` is not an accelerator's memory location (kept: every transfer asks).
        public private(set) var hostAccessible: Bool
        /// Absolute start address in the owner's process.
        public var address: UInt64
        /// Length in bytes.
        public var length: UInt64
        /// Plugin-specific keys (e.g. `rkey`, `lkey`).
        public var extra: [String: JSONValue] {
            didSet { ownProtocol = Self.protocolName(in: extra) }
        }
        /// The protocol this buffer names for itself (upstream's multi-protocol form, `extra`'s
        /// "protocol"), else nil: the segment's. Kept beside `extra` because every transfer asks.
        public private(set) var ownProtocol: String?

        /// Creates a buffer entry.
        public init(name: String, address: UInt64, length: UInt64, extra: [String: JSONValue] = [:]) {
            self.name = name
            self.hostAccessible = MemoryLocation.isHostAccessible(name)
            self.address = address
            self.length = length
            self.extra = extra
            ownProtocol = Self.protocolName(in: extra)
        }

        private static func protocolName(in extra: [String: JSONValue]) -> String? {
            extra.isEmpty ? nil : extra["protocol"]?.stringValue
        }

        /// Decodes one `buffers` entry as strictly as the official engine: a non-empty name and
        /// non-zero addr and length that do not wrap; other keys go to `extra`.
        public static func decode(_ entry: JSONValue, index: Int) throws -> Buffer {
            guard var members = entry.objectValue,
                  let bufferName = members.removeValue(forKey: "name")?.stringValue, !bufferName.isEmpty,
                  let address = members.removeValue(forKey: "addr")?.uint64Value, address != 0,
                  let length = members.removeValue(forKey: "length")?.uint64Value, length != 0
            else { throw EngineError.invalidArgument("segment descriptor buffer \(index) lacks a name, addr or length") }
            guard address.addingReportingOverflow(length).overflow == false else {
                throw EngineError.invalidArgument("segment descriptor buffer \(index) wraps the address space")
            }
            return Buffer(name: bufferName, address: address, length: length, extra: members)
        }

        /// Whether [address, address+length) lies inside this buffer (overflow-safe).
        public func contains(address start: UInt64, length count: UInt64) -> Bool {
            guard count > 0, start >= address else { return false }
            let offset = start - address
            return offset <= length && count <= length - offset
        }
    }

    /// Segment name (`host:rpc_port` in P2P mode).
    public var name: String
    /// Protocol the owner serves (`tcp`, `rdma`, ...).
    public var protocolName: String
    /// The owner's TCP data port (0 when none).
    public var tcpDataPort: UInt16
    /// TCP framing version the owner understands (2 = acknowledged).
    public var tcpProtocolVersion: Int
    /// Publication time, `YYYY-MM-DD HH:MM:SS.uuuuuu` (informational).
    public var timestamp: String
    /// Registered buffers.
    public var buffers: [Buffer]
    /// Other top-level keys (plugin fragments).
    public var extra: [String: JSONValue]

    /// Creates a descriptor.
    public init(name: String, protocolName: String, tcpDataPort: UInt16, tcpProtocolVersion: Int = TCPWire.protocolVersion,
                timestamp: String = SegmentDescriptor.currentTimestamp(), buffers: [Buffer] = [], extra: [String: JSONValue] = [:]) {
        self.name = name
        self.protocolName = protocolName
        self.tcpDataPort = tcpDataPort
        self.tcpProtocolVersion = tcpProtocolVersion
        self.timestamp = timestamp
        self.buffers = buffers
        self.extra = extra
    }

    /// The buffer that holds [address, address+length), if any.
    public func buffer(containing address: UInt64, length: UInt64) -> Buffer? {
        buffers.first { $0.contains(address: address, length: length) }
    }

    /// The JSON form.
    public var json: JSONValue {
        var object = extra
        object["name"] = .string(name)
        object["protocol"] = .string(protocolName)
        object["tcp_data_port"] = .uint(UInt64(tcpDataPort))
        object["tcp_proto_version"] = .uint(UInt64(tcpProtocolVersion))
        object["timestamp"] = .string(timestamp)
        object["buffers"] = .array(buffers.map { buffer in
            var entry = buffer.extra
            entry["name"] = .string(buffer.name)
            entry["addr"] = .uint(buffer.address)
            entry["length"] = .uint(buffer.length)
            return .object(entry)
        })
        return .object(object)
    }

    /// Decodes a descriptor as strictly as the official engine: a string
    /// `protocol`, and every buffer with a non-empty name and non-zero address
    /// and length (otherwise the whole descriptor is rejected).
    public static func decode(_ value: JSONValue) throws -> SegmentDescriptor {
        guard var object = value.objectValue else { throw EngineError.invalidArgument("segment descriptor is not a JSON object") }
        guard let protocolName = object.removeValue(forKey: "protocol")?.stringValue else {
            throw EngineError.invalidArgument("segment descriptor has no string 'protocol'")
        }
        let name = object.removeValue(forKey: "name")?.stringValue ?? ""
        let port = object.removeValue(forKey: "tcp_data_port")?.uint64Value ?? 0
        guard port <= UInt64(UInt16.max) else { throw EngineError.invalidArgument("tcp_data_port \(port) out of range") }
        let version = object.removeValue(forKey: "tcp_proto_version")?.uint64Value ?? 1
        let timestamp = object.removeValue(forKey: "timestamp")?.stringValue ?? ""
        let buffers = try (object.removeValue(forKey: "buffers")?.arrayValue ?? []).enumerated().map { try Buffer.decode($1, index: $0) }
        return SegmentDescriptor(name: name, protocolName: protocolName, tcpDataPort: UInt16(port),
                                 tcpProtocolVersion: Int(min(version, 1000)), timestamp: timestamp, buffers: buffers, extra: object)
    }

    /// Local time formatted like the official engine's descriptor timestamps.
    public static func currentTimestamp() -> String { WallClock.now(utc: false).formatted(separator: " ") }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
