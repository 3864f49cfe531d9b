import FoundationEssentials

// The relay wire format, used by both sides: a peer that cannot see a
// namespace sends these through the owner's handshake port (Connection
// messages), and the owner answers from its own path. One implementation for
// client and server.

/// A relayed read or write of one chunk.
struct RelayRequest: Codable {
    struct Body: Codable {
        var op: String  // "read" or "write"
        var addr: UInt64
        var length: UInt64
        /// Base64 bytes for a write.
        var data: String?
    }

    var nvmeof_relay: Body
}

/// The owner's answer.
struct RelayReply: Codable {
    /// TE_OK or a TE_ERR_* code.
    var status: Int32
    /// Base64 bytes for a read.
    var data: String?
    var error: String?
}

enum RelayCodec {
    static func encode<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes  // base64 is full of '/'
        return (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }

    static func decode<T: Decodable>(_ type: T.Type, _ text: String) -> T? {
        try? JSONDecoder().decode(type, from: Data(text.utf8))
    }

    /// Capacity a reply to a read of `length` bytes needs: base64 plus the JSON around it.
    static func replyCapacity(_ length: UInt64) -> Int { Int(length + 2) / 3 * 4 + 512 }
}
