import CTransferEngineC
import FoundationEssentials
import Synchronization
import TransferEngine

/// A batch prepared now and run later by a host function a GPU stream calls (cudaLaunchHostFunc):
/// the function is `te_stream_job_run`, so running it needs no interpreter lock or other caller
/// state, and a thread that waits on the stream cannot block it.
final class StreamJob: Sendable {
    let handle: EngineHandle
    let requests: [TransferRequest]
    let hint: String

    init(handle: EngineHandle, requests: [TransferRequest], hint: String) {
        self.handle = handle
        self.requests = requests
        self.hint = hint
    }

    /// What the job moves, for a failure's text.
    var summary: String {
        let bytes = requests.reduce(UInt64(0)) { $0 &+ $1.length }
        let operation = requests.first?.operation == .read ? "read" : "write"
        return "\(operation) of \(requests.count) requests (\(bytes) bytes) to segment \(requests.first?.segment ?? -1)"
    }
}

/// Why stream jobs of one engine failed, oldest first, at most `capacity` kept (the oldest go).
final class StreamFailures: Sendable {
    static let capacity = 100
    private let entries = Mutex<[String]>([])

    func record(_ text: String) {
        entries.withLock {
            $0.append(text)
            if $0.count > Self.capacity { $0.removeFirst($0.count - Self.capacity) }
        }
    }

    var all: [String] { entries.withLock { $0 } }
}

@_cdecl("te_stream_job_create")
public func teStreamJobCreate(_ handle: UnsafeMutableRawPointer?, _ entries: UnsafeMutablePointer<transfer_request>?, _ count: Int,
                              _ hint: UnsafePointer<CChar>?) -> UnsafeMutableRawPointer? {
    guard let engineHandle = HandleTable.lookupHandle(handle) else { CResult.fail("invalid engine handle"); return nil }
    do {
        let list = try requests(entries, count)
        guard !list.isEmpty else { throw EngineError.invalidArgument("a stream job needs at least one request") }
        var text = ""
        if let hint {
            guard let valid = String(validatingCString: hint) else { throw EngineError.invalidArgument("transport hint is not valid UTF-8") }
            text = valid
        }
        CResult.clear()
        return Unmanaged.passRetained(StreamJob(handle: engineHandle, requests: list, hint: text)).toOpaque()
    } catch {
        _ = CResult.errorCode(error)
        return nil
    }
}

@_cdecl("te_stream_job_run")
public func teStreamJobRun(_ job: UnsafeMutableRawPointer?) {
    guard let job else { return }
    let work = Unmanaged<StreamJob>.fromOpaque(job).takeRetainedValue()
    do {
        try work.handle.engine.transferBatchSync(work.requests, transportHint: work.hint.isEmpty ? nil : work.hint)
    } catch {
        work.handle.streamFailures.record("\(work.summary): \(error)")
    }
}

@_cdecl("te_stream_job_discard")
public func teStreamJobDiscard(_ job: UnsafeMutableRawPointer?) {
    guard let job else { return }
    Unmanaged<StreamJob>.fromOpaque(job).release()
}

@_cdecl("te_stream_failures")
public func teStreamFailures(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int) -> Int32 {
    guard let engineHandle = HandleTable.lookupHandle(handle) else { CResult.fail("invalid engine handle"); return -1 }
    let text = engineHandle.streamFailures.all.map { String($0.map { $0 == "\n" ? " " : $0 }) }.joined(separator: "\n")
    let bytes = Array(text.utf8)
    guard let buffer, length > bytes.count else {
        CResult.fail("buffer too small: \(bytes.count + 1) bytes needed")
        return Int32(clamping: -(bytes.count + 1))
    }
    for (index, byte) in bytes.enumerated() { buffer[index] = CChar(bitPattern: byte) }
    buffer[bytes.count] = 0
    CResult.clear()
    return Int32(clamping: bytes.count)
}
