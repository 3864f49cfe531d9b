/// The official engine's TCP data-port format, shared by the client and server sides.
///
/// Each request is a 24-byte header: u64 LE payload size, u64 LE remote
/// address, u8 opcode (READ 0, WRITE 1, nothing else; bit 7 set = acknowledged "v2"
/// framing), 7 padding bytes sent as zeros. v2 adds 8-byte LE status frames
/// whose high 32 bits are the magic "MCTV": before READ data, after a WRITE
/// is applied, or ADDR_REJECTED before the connection is closed.
public enum TCPWire {
    /// Size of a request header on the wire.
    public static let headerSize = 24
    /// Size of a v2 status frame.
    public static let statusFrameSize = 8
    /// The opcode bit that selects v2 (acknowledged) framing.
    public static let v2Flag: UInt8 = 0x80
    /// Status frame magic in the high 32 bits.
    public static let statusMagic: UInt64 = 0x4D43_5456 << 32
    /// The protocol version this engine advertises as `tcp_proto_version`.
    public static let protocolVersion = 2

    /// Operation of a request.
    public enum Operation: UInt8, Sendable {
        case read = 0
        case write = 1
    }

    /// Result codes carried in a v2 status frame.
    public enum Status: UInt32, Sendable {
        case ok = 0
        case addressRejected = 1
    }

    /// A decoded request header.
    public struct Header: Equatable, Sendable {
        /// Payload length in bytes.
        public var size: UInt64
        /// Absolute address in the server process.
        public var address: UInt64
        /// Read or write.
        public var operation: Operation
        /// Whether the sender asked for v2 status frames.
        public var acknowledged: Bool

        /// Creates a header.
        public init(size: UInt64, address: UInt64, operation: Operation, acknowledged: Bool) {
            self.size = size
            self.address = address
            self.operation = operation
            self.acknowledged = acknowledged
        }

        /// Encodes the 24 wire bytes into `buffer`.
        public func encode(into buffer: UnsafeMutableRawBufferPointer) {
            precondition(buffer.count >= TCPWire.headerSize)
            buffer.storeBytes(of: size.littleEndian, toByteOffset: 0, as: UInt64.self)
            buffer.storeBytes(of: address.littleEndian, toByteOffset: 8, as: UInt64.self)
            buffer[16] = operation.rawValue | (acknowledged ? TCPWire.v2Flag : 0)
            for i in 17..<24 { buffer[i] = 0 }
        }

        /// The 24 wire bytes.
        public var bytes: [UInt8] {
            var out = [UInt8](repeating: 0, count: TCPWire.headerSize)
            out.withUnsafeMutableBytes { encode(into: $0) }
            return out
        }

        /// Decodes 24 wire bytes; nil for an opcode other than READ or WRITE (with or without the
        /// v2 bit), which no engine sends: it is refused, never served as a READ. Padding is
        /// ignored (upstream sends it uninitialised).
        public static func decode(_ buffer: UnsafeRawBufferPointer) -> Header? {
            precondition(buffer.count >= TCPWire.headerSize)
            let size = UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
            let address = UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            let opcode = buffer[16]
            guard let operation = Operation(rawValue: opcode & 0x7F) else { return nil }
            return Header(size: size, address: address, operation: operation, acknowledged: opcode & TCPWire.v2Flag != 0)
        }

        /// The opcode byte of 24 wire bytes (for reporting a refused one).
        public static func opcode(_ buffer: UnsafeRawBufferPointer) -> UInt8 { buffer[16] }
    }

    /// Encodes a status frame (little-endian u64: magic | status).
    public static func statusFrame(_ status: Status) -> UInt64 {
        (statusMagic | UInt64(status.rawValue)).littleEndian
    }

    /// Decodes a status frame read from the wire; nil when the magic is wrong.
    public static func decodeStatusFrame(_ raw: UInt64) -> UInt32? {
        let value = UInt64(littleEndian: raw)
        guard value & 0xFFFF_FFFF_0000_0000 == statusMagic else { return nil }
        return UInt32(truncatingIfNeeded: value)
    }
}
