import CTransportABI

/// A failed plugin call: the status code the C entry returns and the text `last_error` then
/// gives on the calling thread.
public struct PluginFailure: Error, CustomStringConvertible, Sendable {
    /// A `TE_ERR_*` code (never `TE_OK`).
    public var status: Int32
    /// A sentence for the host's error message and log.
    public var message: String

    /// A failure with `status` and `message`.
    public init(_ status: Int32, _ message: String) {
        self.status = status == TE_OK ? TE_ERR_INTERNAL : status
        self.message = message
    }

    /// A malformed argument (`TE_ERR_INVALID_ARGUMENT`).
    public static func invalid(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_INVALID_ARGUMENT, message) }
    /// Not offered by this plugin (`TE_ERR_NOT_SUPPORTED`).
    public static func notSupported(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_NOT_SUPPORTED, message) }
    /// A range outside registered memory (`TE_ERR_OUT_OF_RANGE`).
    public static func outOfRange(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_OUT_OF_RANGE, message) }
    /// Out of memory or another resource (`TE_ERR_NO_RESOURCES`).
    public static func noResources(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_NO_RESOURCES, message) }
    /// The peer cannot be reached (`TE_ERR_PEER_UNREACHABLE`).
    public static func unreachable(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_PEER_UNREACHABLE, message) }
    /// The peer or its descriptor was refused (`TE_ERR_REJECTED`).
    public static func rejected(_ message: String) -> PluginFailure { PluginFailure(TE_ERR_REJECTED, message) }

    public var description: String { "\(PluginFailure.name(of: status)): \(message)" }

    /// The header's name of a status code.
    public static func name(of status: Int32) -> String {
        switch status {
        case TE_OK: "TE_OK"
        case TE_ERR_INVALID_ARGUMENT: "TE_ERR_INVALID_ARGUMENT"
        case TE_ERR_HARDWARE_ABSENT: "TE_ERR_HARDWARE_ABSENT"
        case TE_ERR_LIBRARY_MISSING: "TE_ERR_LIBRARY_MISSING"
        case TE_ERR_NOT_SUPPORTED: "TE_ERR_NOT_SUPPORTED"
        case TE_ERR_NO_RESOURCES: "TE_ERR_NO_RESOURCES"
        case TE_ERR_BUFFER_TOO_SMALL: "TE_ERR_BUFFER_TOO_SMALL"
        case TE_ERR_OUT_OF_RANGE: "TE_ERR_OUT_OF_RANGE"
        case TE_ERR_PEER_UNREACHABLE: "TE_ERR_PEER_UNREACHABLE"
        case TE_ERR_AGAIN: "TE_ERR_AGAIN"
        case TE_ERR_IO: "TE_ERR_IO"
        case TE_ERR_TIMEOUT: "TE_ERR_TIMEOUT"
        case TE_ERR_INTERNAL: "TE_ERR_INTERNAL"
        case TE_ERR_REJECTED: "TE_ERR_REJECTED"
        default: "status \(status)"
        }
    }
}

/// What `probe` answers: whether the plugin can run here, why, and what to install or set.
public struct ProbeAnswer: Sendable {
    /// `TE_OK`, `TE_ERR_HARDWARE_ABSENT`, `TE_ERR_LIBRARY_MISSING` or another code.
    public var status: Int32
    /// A sentence: what was found, or why nothing usable was.
    public var reason: String
    /// What to install or set (empty when nothing is needed).
    public var hint: String

    /// An answer with `status`, `reason` and `hint`.
    public init(_ status: Int32, reason: String, hint: String = "") {
        self.status = status
        self.reason = reason
        self.hint = hint
    }

    /// The plugin can run: `reason` says what it found.
    public static func ready(_ reason: String) -> ProbeAnswer { ProbeAnswer(TE_OK, reason: reason) }
    /// The hardware is absent.
    public static func absent(_ reason: String, hint: String) -> ProbeAnswer { ProbeAnswer(TE_ERR_HARDWARE_ABSENT, reason: reason, hint: hint) }
}
