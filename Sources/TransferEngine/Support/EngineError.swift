/// Errors the engine reports to its callers.
///
/// Each case carries enough context to act on; `description` is the sentence
/// shown to a user (CLI output, logs, C API last-error text).
public enum EngineError: Error, CustomStringConvertible, Equatable, Sendable {
    /// A configuration value is malformed or inconsistent.
    case invalidConfiguration(String)
    /// A protocol name that neither the engine nor any found plugin serves.
    case unknownProtocol(String, valid: [String])
    /// The requested protocol is unavailable and strict mode forbids the TCP fallback.
    case protocolUnavailable(protocolName: String, reason: String)
    /// The metadata server string is not one of the accepted forms, or its backend is unavailable.
    case invalidMetadataServer(String)
    /// An argument of an API call is invalid.
    case invalidArgument(String)
    /// An address range is not inside one registered buffer.
    case addressNotRegistered(address: UInt64, length: UInt64, side: String)
    /// A registration overlaps an existing one or is otherwise refused.
    case registrationConflict(String)
    /// A segment could not be opened or reached.
    case segmentUnavailable(name: String, reason: String)
    /// A batch id that is unknown or already freed.
    case invalidBatch(UInt64)
    /// A batch is full or still has tasks in flight.
    case batchBusy(String)
    /// A transfer failed.
    case transferFailed(String)
    /// An operating system call failed.
    case system(call: String, errno: Int32)
    /// A plugin could not be loaded or used.
    case plugin(String)
    /// The operation did not finish in time.
    case timeout(String)
    /// A peer failed (or refused) the shared-secret authentication.
    case authenticationFailed(String)

    public var description: String {
        switch self {
        case .invalidConfiguration(let text): return "invalid configuration: \(text)"
        case .unknownProtocol(let name, let valid):
            return "unknown protocol '\(name)'; valid protocols: \(valid.joined(separator: ", "))"
        case .protocolUnavailable(let name, let reason):
            return "protocol '\(name)' is unavailable: \(reason)"
        case .invalidMetadataServer(let text): return "invalid metadata server: \(text)"
        case .invalidArgument(let text): return "invalid argument: \(text)"
        case .addressNotRegistered(let address, let length, let side):
            return "\(side) range [0x\(String(address, radix: 16)), +\(length)) is not inside one registered buffer"
        case .registrationConflict(let text): return "registration refused: \(text)"
        case .segmentUnavailable(let name, let reason): return "segment '\(name)' unavailable: \(reason)"
        case .invalidBatch(let id): return "unknown batch id \(id)"
        case .batchBusy(let text): return "batch busy: \(text)"
        case .transferFailed(let text): return "transfer failed: \(text)"
        case .system(let call, let errno): return "\(call) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .plugin(let text): return "plugin error: \(text)"
        case .timeout(let text): return "timed out: \(text)"
        case .authenticationFailed(let text): return "authentication failed: \(text)"
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
