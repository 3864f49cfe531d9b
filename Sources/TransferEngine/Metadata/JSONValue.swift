import FoundationEssentials

/// A JSON value that keeps 64-bit unsigned integers exact.
///
/// Segment descriptors carry absolute addresses as JSON integers above 2^53,
/// and plugin fragments are arbitrary JSON, so the engine handles JSON through
/// this type rather than fixed `Codable` structs.
public enum JSONValue: Codable, Equatable, Sendable, CustomStringConvertible {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null; return }
        if let value = try? container.decode(Bool.self) { self = .bool(value); return }
        if let value = try? container.decode(UInt64.self) { self = .uint(value); return }
        if let value = try? container.decode(Int64.self) { self = .int(value); return }
        if let value = try? container.decode(Double.self) { self = .double(value); return }
        if let value = try? container.decode(String.self) { self = .string(value); return }
        if let value = try? container.decode([JSONValue].self) { self = .array(value); return }
        self = .object(try container.decode([String: JSONValue].self))
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let v): try container.encode(v)
        case .int(let v): try container.encode(v)
        case .uint(let v): try container.encode(v)
        case .double(let v): try container.encode(v)
        case .string(let v): try container.encode(v)
        case .array(let v): try container.encode(v)
        case .object(let v): try container.encode(v)
        }
    }

    /// Parses JSON text. Errors name the position when the parser reports one.
    public static func parse(_ text: String) throws -> JSONValue {
        try parse(Array(text.utf8))
    }

    /// Parses JSON bytes.
    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch let DecodingError.dataCorrupted(context) {
            let position = JSONSyntaxLocator.firstError(in: bytes)
            throw JSONParseError(message: position ?? context.underlyingError.map { "\($0)" } ?? context.debugDescription)
        }
    }

    /// Compact JSON text with sorted keys (as jsoncpp writes it).
    public var compactText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let data = (try? encoder.encode(self)) ?? Data("null".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    public var description: String { compactText }

    /// The member `key` of an object, or nil.
    public subscript(key: String) -> JSONValue? {
        if case .object(let members) = self { return members[key] }
        return nil
    }

    /// The string payload, or nil.
    public var stringValue: String? {
        if case .string(let v) = self { return v }
        return nil
    }

    /// An exact unsigned integer (accepts non-negative ints and integral doubles below 2^53).
    public var uint64Value: UInt64? {
        switch self {
        case .uint(let v): return v
        case .int(let v): return v >= 0 ? UInt64(v) : nil
        case .double(let v): return v >= 0 && v < 9_007_199_254_740_992 && v.rounded() == v ? UInt64(v) : nil
        default: return nil
        }
    }

    /// The object members, or nil.
    public var objectValue: [String: JSONValue]? {
        if case .object(let v) = self { return v }
        return nil
    }

    /// The array elements, or nil.
    public var arrayValue: [JSONValue]? {
        if case .array(let v) = self { return v }
        return nil
    }
}

/// A JSON syntax error with the parser's description (which includes line and column).
public struct JSONParseError: Error, CustomStringConvertible, Sendable {
    /// The parser's message.
    public var message: String
    public var description: String { "malformed JSON: \(message)" }
}
