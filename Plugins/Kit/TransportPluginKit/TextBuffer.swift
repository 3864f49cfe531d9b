import CTransportABI

/// Writing and reading the C strings that cross the ABI.
public enum CText {
    /// Writes `text` into a caller's `te_buffer` (NUL-terminated, `length` = full length);
    /// `TE_ERR_BUFFER_TOO_SMALL` when it does not fit, so the caller retries with `length + 1`.
    /// A nil buffer takes nothing and succeeds.
    @discardableResult
    public static func write(_ text: String, to out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
        guard let out else { return TE_OK }
        var text = text
        return text.withUTF8 { bytes in
            out.pointee.length = bytes.count
            guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
            if let source = bytes.baseAddress { UnsafeMutableRawPointer(data).copyMemory(from: source, byteCount: bytes.count) }
            data[bytes.count] = 0
            return TE_OK
        }
    }

    /// The text of a C string, or `fallback` for NULL.
    public static func read(_ pointer: UnsafePointer<CChar>?, or fallback: String = "") -> String {
        pointer.map { String(cString: $0) } ?? fallback
    }

    /// A pointer to a static string's bytes (which live as long as the loaded object).
    public static func pointer(_ text: StaticString) -> UnsafePointer<CChar> {
        UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}

/// JSON text for descriptor fragments and handshakes built by hand.
public enum JSONFragment {
    /// `text` as a JSON string literal (quoted, escaped).
    public static func string(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Bytes as lower-case hex digits.
    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes { out.append(digits[Int(byte >> 4)]); out.append(digits[Int(byte & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    /// Hex digits (either case) as bytes; nil for an odd count, an empty text or another character.
    public static func unhex(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0, !chars.isEmpty else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let high = nibble(chars[i]), let low = nibble(chars[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }

}
