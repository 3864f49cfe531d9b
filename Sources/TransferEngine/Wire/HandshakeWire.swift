/// The official engine's handshake-port framing, shared by client and server.
///
/// A message is a u64 length in host byte order (= 1 + JSON length), a type
/// byte, then the JSON text. One request and one reply per connection. The
/// legacy form without a type byte (first JSON byte `{` > 3) is a Connection
/// request and is answered in the same legacy form.
public enum HandshakeWire {
    /// Message kinds.
    public enum Kind: UInt8, Sendable {
        /// Transport endpoint exchange (RDMA QPs, plugin handshakes).
        case connection = 0
        /// P2P segment descriptor fetch.
        case metadata = 1
        /// A notification message for `getNotifies`.
        case notify = 2
        /// Liveness probe.
        case probe = 3
    }

    /// Default upper bound on a message (MC_HANDSHAKE_MAX_LENGTH), as upstream.
    public static let defaultMaxLength = 1 << 20

    /// A decoded message.
    public struct Message: Equatable, Sendable {
        /// The message kind.
        public var kind: Kind
        /// The JSON body.
        public var json: String
        /// True for the legacy form without a type byte.
        public var legacy: Bool

        /// Creates a message.
        public init(kind: Kind, json: String, legacy: Bool = false) {
            self.kind = kind
            self.json = json
            self.legacy = legacy
        }

        /// The bytes on the wire.
        public var encoded: [UInt8] {
            let body = Array(json.utf8)
            var out: [UInt8] = []
            out.reserveCapacity(9 + body.count)
            let length = UInt64(body.count + (legacy ? 0 : 1))
            withUnsafeBytes(of: length) { out.append(contentsOf: $0) }  // host order, as upstream
            if !legacy { out.append(kind.rawValue) }
            out.append(contentsOf: body)
            return out
        }
    }

    /// Why a frame was refused.
    public enum FrameError: Error, CustomStringConvertible, Equatable {
        case emptyMessage
        case tooLong(UInt64, limit: Int)
        case unknownType(UInt8)
        case notUTF8

        public var description: String {
            switch self {
            case .emptyMessage: return "handshake message of length 0"
            case .tooLong(let n, let limit): return "handshake message of \(n) bytes exceeds the limit of \(limit)"
            case .unknownType(let t): return "unknown handshake message type \(t)"
            case .notUTF8: return "handshake body is not UTF-8"
            }
        }
    }

    /// Validates a length prefix against the limit.
    public static func checkLength(_ length: UInt64, limit: Int = defaultMaxLength) throws -> Int {
        if length == 0 { throw FrameError.emptyMessage }
        if length > UInt64(limit) { throw FrameError.tooLong(length, limit: limit) }
        return Int(length)
    }

    /// Decodes the `length` bytes that follow the prefix.
    public static func decodeBody(_ body: [UInt8]) throws -> Message {
        guard let first = body.first else { throw FrameError.emptyMessage }
        if first > 3 {
            guard let text = String(validating: body, as: UTF8.self) else { throw FrameError.notUTF8 }
            return Message(kind: .connection, json: text, legacy: true)
        }
        guard let kind = Kind(rawValue: first) else { throw FrameError.unknownType(first) }
        guard let text = String(validating: body.dropFirst(), as: UTF8.self) else { throw FrameError.notUTF8 }
        return Message(kind: kind, json: text)
    }
}
