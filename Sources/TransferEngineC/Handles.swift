import CTransferEngineC
import FoundationEssentials
import Logging
import Synchronization
import TransferEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The object behind a `transfer_engine_t`.
final class EngineHandle: Sendable {
    let engine: TransferEngine
    /// Why batches run by GPU streams (te_stream_job_run) failed.
    let streamFailures = StreamFailures()
    /// Stream jobs made for this engine and not yet run or discarded.
    let pendingStreamJobs = Atomic<Int>(0)
    init(engine: TransferEngine) { self.engine = engine }
}

/// Live handles. A stale or foreign pointer is looked up here instead of being
/// dereferenced, so a bad handle yields an error instead of a crash.
enum HandleTable {
    private static let live = Mutex<[UInt: EngineHandle]>([:])

    static func insert(_ handle: EngineHandle) -> UnsafeMutableRawPointer {
        let pointer = Unmanaged.passUnretained(handle).toOpaque()
        live.withLock { $0[UInt(bitPattern: pointer)] = handle }
        return pointer
    }

    static func lookup(_ pointer: UnsafeMutableRawPointer?) -> TransferEngine? { lookupHandle(pointer)?.engine }

    /// The handle object itself (what outlives a destroyTransferEngine for a job holding it).
    static func lookupHandle(_ pointer: UnsafeMutableRawPointer?) -> EngineHandle? {
        guard let pointer else { return nil }
        return live.withLock { $0[UInt(bitPattern: pointer)] }
    }

    static func remove(_ pointer: UnsafeMutableRawPointer?) -> TransferEngine? {
        guard let pointer else { return nil }
        return live.withLock { $0.removeValue(forKey: UInt(bitPattern: pointer))?.engine }
    }
}

/// Error reporting for the C entry points.
enum CResult {
    static func fail(_ message: String) { te_set_last_error(message) }
    static func clear() { te_set_last_error("") }

    /// The negative ERR_* code for an error (int-returning functions).
    static func errorCode(_ error: Error) -> Int32 {
        fail("\(error)")
        guard let error = error as? EngineError else { return -102 }
        switch error {
        case .invalidConfiguration, .invalidArgument, .invalidBatch, .unknownProtocol, .invalidMetadataServer: return -1
        case .addressNotRegistered: return -3
        case .batchBusy: return -4
        case .protocolUnavailable: return -6
        case .registrationConflict: return -7
        case .segmentUnavailable, .authenticationFailed: return -200
        case .plugin: return -202
        case .transferFailed, .system, .timeout: return -102
        }
    }

    /// The positive status code for an error (status-returning functions).
    static func statusCode(_ error: Error) -> Int32 {
        fail("\(error)")
        guard let error = error as? EngineError else { return 102 }
        switch error {
        case .invalidConfiguration, .invalidArgument, .invalidBatch, .unknownProtocol, .invalidMetadataServer: return 1
        case .addressNotRegistered: return 3
        case .batchBusy: return 4
        case .protocolUnavailable: return 8
        case .registrationConflict: return 7
        case .segmentUnavailable, .authenticationFailed: return 200
        case .plugin: return 202
        case .transferFailed, .system, .timeout: return 102
        }
    }

    /// A String from a C string, or nil (with the error set) when it is NULL or not UTF-8.
    static func string(_ pointer: UnsafePointer<CChar>?, _ what: String) -> String? {
        guard let pointer else { fail("\(what) is NULL"); return nil }
        guard let text = String(validatingCString: pointer) else { fail("\(what) is not UTF-8"); return nil }
        return text
    }

    /// A notification's text from a C string, or nil (with the error set) when it is NULL. Bytes
    /// that are not UTF-8 are replaced by U+FFFD (upstream's JSON writer replaces them too);
    /// refusing them would fail callers that pass binary messages (NIXL's backend passes whatever
    /// its user sent).
    static func notificationText(_ pointer: UnsafePointer<CChar>?, _ what: String) -> String? {
        guard let pointer else { fail("\(what) is NULL"); return nil }
        return String(cString: pointer)
    }
}

/// Creates an engine from explicit settings (environment and config file fill the rest)
/// and returns its handle, or nil with te_last_error set.
func startEngine(_ overrides: EngineConfiguration.Overrides,
                 customize: (inout EngineConfiguration, [String: String]) -> Void = { _, _ in }) -> UnsafeMutableRawPointer? {
    let environment = ProcessInfo.processInfo.environment
    do {
        var (configuration, warnings) = try EngineConfiguration.resolve(overrides, environment: environment)
        customize(&configuration, environment)
        for warning in warnings { CLogging.logger.warning("\(warning)") }
        let engine = try TransferEngine(configuration: configuration, environment: environment, logger: CLogging.logger)
        CResult.clear()
        return HandleTable.insert(EngineHandle(engine: engine))
    } catch {
        _ = CResult.errorCode(error)
        return nil
    }
}

/// Copies `text` and a NUL into a caller's buffer; 0, or -1 when it does not fit.
func copyOut(_ text: String, to buffer: UnsafeMutablePointer<CChar>?, length: Int) -> Int32 {
    let bytes = Array(text.utf8)
    guard let buffer, length > bytes.count else { CResult.fail("buffer of \(length) bytes too small for '\(text)'"); return -1 }
    for (i, byte) in bytes.enumerated() { buffer[i] = CChar(bitPattern: byte) }
    buffer[bytes.count] = 0
    return 0
}

/// The logger used by engines created through the C API: standard error, MC_LOG_LEVEL (default
/// warning) and MC_LOG_FORMAT; a bad value falls back to the defaults with one line saying so.
enum CLogging {
    static let logger: Logger = {
        var environment: [String: String] = [:]
        for key in ["MC_LOG_LEVEL", "MC_LOG_FORMAT"] { if let value = getenv(key) { environment[key] = String(cString: value) } }
        var problems: [String] = []
        let settings = (try? LogSettings.resolve(environment: environment, defaultLevel: .warning, environmentProblem: { problems.append($0) }))
            ?? LogSettings(level: .warning)
        let logger = Logger(label: "transfer-engine") { label in settings.makeHandler(label: label) }
        for problem in problems { logger.warning("\(problem)") }
        return logger
    }()
}
