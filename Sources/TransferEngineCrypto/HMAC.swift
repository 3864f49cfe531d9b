// HMAC-SHA256 from swift-crypto behind a byte-array interface. A module of its own: swift-crypto
// brings Foundation with it, whose extensions would otherwise make names in the engine (which
// uses FoundationEssentials) ambiguous.
import Crypto

/// HMAC-SHA256 over byte arrays (swift-crypto).
public enum HMACSHA256 {
    /// The 32-byte authentication code of `message` under `key`.
    public static func code(key: [UInt8], message: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: key)))
    }

    /// Whether `code` authenticates `message` under `key`, compared in constant time.
    public static func isValid(_ code: [UInt8], key: [UInt8], message: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(code, authenticating: message, using: SymmetricKey(data: key))
    }
}
