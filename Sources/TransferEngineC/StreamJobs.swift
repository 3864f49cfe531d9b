import CTransferEngineC
import FoundationEssentials
import Synchronization
import TransferEngine

/// A batch prepared now and run later by a host function a GPU stream calls (cudaLaunchHostFunc):
/// the function is `te_stream_job_run`, so running it needs no interpreter lock or other caller
/// state, and a thread that waits on the stream cannot block it.
final class StreamJob: Sendable {
    let handle: EngineHandle
    /// The C handle it was made for: the job runs only while that handle is live.
    let handleBits: UInt
    let requests: [TransferRequest]
    let hint: String

    init(handle: EngineHandle, handleBits: UInt, requests: [TransferRequest], hint: String) {
        self.handle = handle
        self.handleBits = handleBits
        self.requests = requests
        self.hint = hint
    }

    /// What the job moves, for a failure's text.
    var summary: String {
        let bytes = requests.reduce(UInt64(0)) { $0 &+ $1.length }
        let reads = requests.count { $0.operation == .read }
        let segments = Set(requests.map(\.segment)).sorted().prefix(4).map(String.init).joined(separator: ",")
        return "\(requests.count) requests (\(reads) reads, \(requests.count - reads) writes, \(bytes) bytes) to segment \(segments)"
    }
}

/// Jobs made and not yet run or discarded: a pointer that is not one of them (run twice, or
/// after discard, or never made here) is ignored instead of being released again.
enum StreamJobTable {
    private static let live = Mutex<Set<UInt>>([])

    static func insert(_ job: StreamJob) -> UnsafeMutableRawPointer {
        let pointer = Unmanaged.passRetained(job).toOpaque()
        job.handle.pendingStreamJobs.add(1, ordering: .relaxed)
        live.withLock { _ = $0.insert(UInt(bitPattern: pointer)) }
        return pointer
    }

    /// Takes the job out of the table (and its retain), or nil for a pointer not in it.
    static func take(_ pointer: UnsafeMutableRawPointer?) -> StreamJob? {
        guard let pointer, live.withLock({ $0.remove(UInt(bitPattern: pointer)) != nil }) else { return nil }
        let job = Unmanaged<StreamJob>.fromOpaque(pointer).takeRetainedValue()
        job.handle.pendingStreamJobs.subtract(1, ordering: .relaxed)
        return job
    }
}

/// Why stream jobs of one engine failed, oldest first, at most `capacity` kept (the oldest go),
/// each on one line of at most `maxLength` characters.
final class StreamFailures: Sendable {
    static let capacity = 100
    static let maxLength = 1024
    private let entries = Mutex<[String]>([])

    func record(_ text: String) {
        let line = String(String(text.map { $0.isNewline ? " " : $0 }).prefix(Self.maxLength))
        entries.withLock {
            $0.append(line)
            if $0.count > Self.capacity { $0.removeFirst($0.count - Self.capacity) }
        }
    }

    var all: [String] { entries.withLock { $0 } }
}

@_cdecl("te_stream_job_create")
public func teStreamJobCreate(_ handle: UnsafeMutableRawPointer?, _ entries: UnsafeMutablePointer<transfer_request>?, _ count: Int,
                              _ hint: UnsafePointer<CChar>?) -> UnsafeMutableRawPointer? {
    guard let handle, let engineHandle = HandleTable.lookupHandle(handle) else { CResult.fail("invalid engine handle"); return nil }
    do {
        let list = try requests(entries, count)
        guard !list.isEmpty else { throw EngineError.invalidArgument("a stream job needs at least one request") }
        guard let text = checkedHint(hint) else { return nil }
        CResult.clear()
        return StreamJobTable.insert(StreamJob(handle: engineHandle, handleBits: UInt(bitPattern: handle), requests: list, hint: text))
    } catch {
        _ = CResult.errorCode(error)
        return nil
    }
}

@_cdecl("te_stream_job_run")
public func teStreamJobRun(_ job: UnsafeMutableRawPointer?) {
    guard let work = StreamJobTable.take(job) else { return }
    // After destroyTransferEngine the caller may have freed its buffers: nothing moves then.
    guard HandleTable.lookupHandle(UnsafeMutableRawPointer(bitPattern: work.handleBits)) === work.handle else {
        work.handle.streamFailures.record("\(work.summary): the engine was destroyed before the stream ran the job")
        return
    }
    do {
        try work.handle.engine.transferBatchSync(work.requests, transportHint: work.hint.isEmpty ? nil : work.hint)
    } catch {
        work.handle.streamFailures.record("\(work.summary): \(error)")
    }
}

@_cdecl("te_stream_job_discard")
public func teStreamJobDiscard(_ job: UnsafeMutableRawPointer?) {
    _ = StreamJobTable.take(job)
}

@_cdecl("te_stream_jobs_pending")
public func teStreamJobsPending(_ handle: UnsafeMutableRawPointer?) -> Int32 {
    guard let engineHandle = HandleTable.lookupHandle(handle) else { CResult.fail("invalid engine handle"); return -1 }
    return Int32(clamping: engineHandle.pendingStreamJobs.load(ordering: .relaxed))
}

@_cdecl("te_stream_failures")
public func teStreamFailures(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int) -> Int32 {
    guard let engineHandle = HandleTable.lookupHandle(handle) else { CResult.fail("invalid engine handle"); return -1 }
    let bytes = Array(engineHandle.streamFailures.all.joined(separator: "\n").utf8)
    CResult.clear()
    if bytes.isEmpty {
        if let buffer, length > 0 { buffer[0] = 0 }
        return 0
    }
    guard let buffer, length > bytes.count else {
        CResult.fail("buffer too small: \(bytes.count + 1) bytes needed")
        return Int32(clamping: -(bytes.count + 1))
    }
    for (index, byte) in bytes.enumerated() { buffer[index] = CChar(bitPattern: byte) }
    buffer[bytes.count] = 0
    return Int32(clamping: bytes.count)
}
