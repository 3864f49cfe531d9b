import FoundationEssentials
import TransferEngineCrypto

/// Opt-in mutual authentication of peers with a shared secret (MC_AUTH_SECRET, MC_AUTH_SECRET_FILE
/// or the config file's `auth_secret`), before any descriptor or byte is served, on the handshake
/// port and on every data connection. Off by default, so the official engine still interoperates.
///
/// The exchange, right after connect (server speaks first):
///   server -> client: "MCAU" + 32-byte server nonce
///   client -> server: HMAC-SHA256(secret, "client/<channel>" + server nonce + client nonce) + client nonce
///   server -> client: HMAC-SHA256(secret, "server/<channel>" + client nonce + server nonce)
/// Each side proves it knows the secret for this connection only (fresh nonces on both sides,
/// the channel name bound in), so a reply cannot be replayed or moved to another port.
public struct PeerAuthenticator: Sendable {
    /// Which port the exchange protects (bound into the MACs).
    public enum Channel: String, Sendable {
        case handshake, data
    }

    static let magic: [UInt8] = Array("MCAU".utf8)
    static let nonceSize = 32
    static let challengeSize = magic.count + nonceSize
    static let responseSize = 32 + nonceSize
    static let proofSize = 32

    private let key: [UInt8]

    /// A secret shorter than this is refused (it would be guessable).
    public static let minimumSecretBytes = 16

    /// Creates an authenticator; throws for a secret that is too short.
    public init(secret: String) throws {
        let bytes = Array(secret.utf8)
        guard bytes.count >= Self.minimumSecretBytes else {
            throw EngineError.invalidConfiguration("the authentication secret must be at least \(Self.minimumSecretBytes) bytes (got \(bytes.count))")
        }
        key = bytes
    }

    /// The secret from MC_AUTH_SECRET, else the file MC_AUTH_SECRET_FILE names (trailing newline
    /// dropped), else the configuration's; nil when none is set (authentication off).
    static func secret(environment: [String: String], configured: String?) throws -> String? {
        if let secret = environment["MC_AUTH_SECRET"], !secret.isEmpty { return secret }
        if let path = environment["MC_AUTH_SECRET_FILE"], !path.isEmpty {
            guard let data = FileManager.default.contents(atPath: path) else {
                throw EngineError.invalidConfiguration("MC_AUTH_SECRET_FILE '\(path)' cannot be read")
            }
            return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespaces)
        }
        return configured.flatMap { $0.isEmpty ? nil : $0 }
    }

    private static func nonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<nonceSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    private func mac(_ label: String, _ channel: Channel, _ first: some Sequence<UInt8>, _ second: some Sequence<UInt8>) -> [UInt8] {
        HMACSHA256.code(key: key, message: Array("\(label)/\(channel.rawValue)".utf8) + Array(first) + Array(second))
    }

    // MARK: - The server's steps (also used by the non-blocking handshake server)

    /// A fresh challenge: magic + server nonce.
    func challenge() -> [UInt8] { Self.magic + Self.nonce() }

    /// Checks a client's response to `challenge`; the proof to send back, or nil when it is wrong.
    func verify(response: [UInt8], to challenge: [UInt8], channel: Channel) -> [UInt8]? {
        guard response.count == Self.responseSize, challenge.count == Self.challengeSize else { return nil }
        let serverNonce = challenge[Self.magic.count...]
        let clientNonce = response[32...]
        // Constant time: a timing difference must not tell how much of a guess was right.
        guard HMACSHA256.isValid(Array(response[0..<32]), key: key, message: Array("client/\(channel.rawValue)".utf8) + serverNonce + clientNonce) else {
            return nil
        }
        return mac("server", channel, clientNonce, serverNonce)
    }

    // MARK: - Blocking exchanges over a socket

    /// The client side: answers the server's challenge and checks its proof, within `deadline`.
    func authenticateAsClient(_ socket: Socket, channel: Channel, deadline: UInt64) throws {
        var challenge = [UInt8](repeating: 0, count: Self.challengeSize)
        do {
            try challenge.withUnsafeMutableBytes { try socket.receiveAll($0.baseAddress!, count: $0.count, deadline: deadline) }
        } catch {
            throw EngineError.authenticationFailed("no challenge from the peer's \(channel) port (does it have authentication on?): \(error)")
        }
        guard Array(challenge[0..<Self.magic.count]) == Self.magic else {
            throw EngineError.authenticationFailed("the peer's \(channel) port does not authenticate (authentication is on here)")
        }
        let clientNonce = Self.nonce()
        let response = mac("client", channel, challenge[Self.magic.count...], clientNonce) + clientNonce
        try response.withUnsafeBytes { try socket.sendAll([$0], deadline: deadline) }
        var proof = [UInt8](repeating: 0, count: Self.proofSize)
        do {
            try proof.withUnsafeMutableBytes { try socket.receiveAll($0.baseAddress!, count: $0.count, deadline: deadline) }
        } catch {
            throw EngineError.authenticationFailed("the peer refused our authentication on its \(channel) port (different secret?)")
        }
        guard HMACSHA256.isValid(proof, key: key, message: Array("server/\(channel.rawValue)".utf8) + clientNonce + challenge[Self.magic.count...]) else {
            throw EngineError.authenticationFailed("the peer's \(channel) port could not prove it knows the secret")
        }
    }

    /// The server side, for a thread that may block: challenge, check, prove; false when the
    /// peer failed (the caller closes the connection).
    func authenticateAsServer(_ socket: Socket, channel: Channel, deadline: UInt64) -> Bool {
        let challenge = challenge()
        var response = [UInt8](repeating: 0, count: Self.responseSize)
        do {
            try challenge.withUnsafeBytes { try socket.sendAll([$0], deadline: deadline) }
            try response.withUnsafeMutableBytes { try socket.receiveAll($0.baseAddress!, count: $0.count, deadline: deadline) }
        } catch { return false }
        guard let proof = verify(response: response, to: challenge, channel: channel) else { return false }
        return (try? proof.withUnsafeBytes { try socket.sendAll([$0], deadline: deadline) }) != nil
    }
}
