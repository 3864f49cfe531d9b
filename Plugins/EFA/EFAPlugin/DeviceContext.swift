import CEFAShim
import CTransportABI
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One piece of a request, posted as one fi_write / fi_read.
struct Part {
    var isWrite: Bool
    var local: UInt64
    var length: UInt64
    var descriptor: UnsafeMutableRawPointer?
    var peer: UInt64
    var remote: UInt64
    var key: UInt64
    var parent: UInt64
    /// When submit queued it (the timeout also covers a part the endpoint keeps refusing).
    var queuedAt: UInt64 = 0
    /// A connection probe of openPeer (no bytes), kept out of the device's figures.
    var isProbe = false
}

/// A finished part, reported to the instance outside the context's lock.
struct FinishedPart {
    var parent: UInt64
    var status: Int32
    var bytes: UInt64
    var error: String?
}

/// One opened libfabric domain: its endpoint, a table of operation slots
/// (the FI_CONTEXT2 memory each posted operation needs), a backlog of parts
/// waiting for a slot, and a progress thread. Software providers progress
/// manually, so the thread also serves a peer's one-sided operations on an
/// endpoint that never posts anything itself.
final class DeviceContext: @unchecked Sendable {
    let index: Int
    /// Device name as published (`rdmap0s6` for the domain `rdmap0s6-rdm`).
    let name: String
    let info: efa_domain_info
    let handle: OpaquePointer
    /// Whether remote addresses are virtual addresses (FI_MR_VIRT_ADDR) rather than offsets.
    let virtualAddressing: Bool
    /// Whether every local buffer needs a registration descriptor (FI_MR_LOCAL).
    let needsLocalDescriptor: Bool

    private let lock = Signal()
    private static let slotBytes = 64
    private let slotMemory: UnsafeMutableRawPointer
    private let capacity: Int
    private var slotParts: [Part]
    private var freeSlots: [Int32]
    /// When each slot's operation was posted (0: free).
    private var slotPostedAt: [UInt64]
    /// Slots whose operation was reported as timed out; libfabric still owns their context.
    private var slotAbandoned: [Bool]
    private let timeoutNanoseconds: UInt64
    private var lastTimeoutScan: UInt64 = 0
    private var backlog: [Part] = []
    private var backlogHead = 0
    private var sleeping = false
    private var stopping = false
    private var running = false
    private var cqContexts = [UnsafeMutableRawPointer?](repeating: nil, count: 64)
    private let spinNanoseconds: UInt64
    private let onFinished: ([FinishedPart]) -> Void
    /// Bytes and errors for the ABI's `stats`: a part counts from its post until its outcome is
    /// reported (a completion, an error, or the timeout that gives up on it).
    let counters: DeviceCounters

    init(index: Int, handle: OpaquePointer, maxOutstanding: Int, spinNanoseconds: UInt64, timeoutNanoseconds: UInt64,
         onFinished: @escaping ([FinishedPart]) -> Void) {
        self.index = index
        self.handle = handle
        info = efa_info(handle).pointee
        name = EFAOptions.deviceName(domain: info.domainName)
        virtualAddressing = info.mr_mode & UInt64(EFA_MR_VIRT_ADDR) != 0
        needsLocalDescriptor = info.mr_mode & UInt64(EFA_MR_LOCAL) != 0
        capacity = max(1, min(maxOutstanding, Int(clamping: info.tx_size == 0 ? 256 : info.tx_size)))
        slotMemory = UnsafeMutableRawPointer.allocate(byteCount: capacity * Self.slotBytes, alignment: 64)
        slotMemory.initializeMemory(as: UInt8.self, repeating: 0, count: capacity * Self.slotBytes)
        slotParts = [Part](repeating: Part(isWrite: false, local: 0, length: 0, descriptor: nil, peer: 0, remote: 0, key: 0, parent: 0),
                           count: capacity)
        freeSlots = (0..<Int32(capacity)).reversed().map { $0 }
        slotPostedAt = [UInt64](repeating: 0, count: capacity)
        slotAbandoned = [Bool](repeating: false, count: capacity)
        self.timeoutNanoseconds = timeoutNanoseconds
        self.spinNanoseconds = spinNanoseconds
        self.onFinished = onFinished
        counters = DeviceCounters(name: name)
    }

    /// Runs domain operations (address-vector changes) under the lock that serialises this
    /// domain's calls, as FI_THREAD_DOMAIN requires.
    func serialized<R>(_ body: () -> R) -> R { lock.locked(body) }

    /// Starts the progress thread.
    func start() -> Bool {
        lock.locked { running = true }
        let started = startThread { [self] in progressLoop() }
        if !started { lock.locked { running = false } }
        return started
    }

    /// Stops the progress thread and closes the endpoint.
    func close() {
        lock.locked { stopping = true }
        efa_wake(handle)
        lock.locked { while running { lock.wait(nanoseconds: 10_000_000) } }
        efa_close(handle)
        slotMemory.deallocate()
    }

    /// Queues parts and posts what the endpoint accepts now.
    func enqueue(_ parts: [Part]) {
        var finished: [FinishedPart] = []
        let wake = lock.locked { () -> Bool in
            for part in parts {
                guard backlogHead == backlog.count else { backlog.append(part); continue }  // keep order
                if let failure = post(part) {
                    if failure == efa_err_again() { backlog.append(part) } else { finished.append(fail(part, failure)) }
                }
            }
            return sleeping
        }
        // The progress thread reads the completions; wake it if it sleeps.
        if wake { efa_wake(handle) }
        if !finished.isEmpty { onFinished(finished) }
    }

    /// Reads completions on the caller's thread if no one else is (a poll() from the host).
    func tryProgress() {
        var finished: [FinishedPart] = []
        _ = lock.tryLocked { progressLocked(&finished) }
        if !finished.isEmpty { onFinished(finished) }
    }

    private func fail(_ part: Part, _ code: Int32) -> FinishedPart {
        if !part.isProbe { counters.failed() }
        return FinishedPart(parent: part.parent, status: TE_ERR_IO, bytes: 0,
                            error: "\(part.isWrite ? "fi_write" : "fi_read") of \(part.length) bytes on \(name): \(LibfabricError(code: code))")
    }

    /// Posts one part; nil on success, else the libfabric error (EAGAIN: no slot or queue full). Lock held.
    private func post(_ part: Part) -> Int32? {
        guard let slot = freeSlots.popLast() else { return efa_err_again() }
        slotParts[Int(slot)] = part
        let context = slotMemory + Int(slot) * Self.slotBytes
        let status = efa_post(handle, part.isWrite ? 1 : 0, UnsafeMutableRawPointer(bitPattern: UInt(part.local)), Int(part.length),
                              part.descriptor, part.peer, part.remote, part.key, context)
        if status == 0 {
            if !part.isProbe { counters.started(part.length) }
            slotPostedAt[Int(slot)] = monotonicNanoseconds()
            return nil
        }
        freeSlots.append(slot)
        return Int32(clamping: status)
    }

    private func slot(of context: UnsafeMutableRawPointer?) -> Int? {
        guard let context else { return nil }
        let offset = context - UnsafeMutableRawPointer(slotMemory)
        guard offset >= 0, offset % Self.slotBytes == 0, offset / Self.slotBytes < capacity else { return nil }
        return offset / Self.slotBytes
    }

    /// Reads completions, then posts waiting parts. Lock held. Returns whether anything happened.
    private func progressLocked(_ finished: inout [FinishedPart]) -> Bool {
        var worked = false
        var failure = efa_failure()
        while true {
            let n = cqContexts.withUnsafeMutableBufferPointer { buffer in
                efa_cq_read(handle, buffer.baseAddress, buffer.count, &failure)
            }
            if n > 0 {
                for i in 0..<n {
                    guard let slot = slot(of: cqContexts[i]) else { continue }
                    let part = slotParts[slot]
                    if release(slot) {
                        if !part.isProbe { counters.ended(part.length, isWrite: part.isWrite, succeeded: true) }
                        finished.append(FinishedPart(parent: part.parent, status: TE_OK, bytes: part.length, error: nil))
                    }
                }
                worked = true
                if n < cqContexts.count { break }
            } else if n == -1 {
                worked = true
                let text = withUnsafeBytes(of: failure.text) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if let slot = slot(of: failure.op_context) {
                    let part = slotParts[slot]
                    guard release(slot) else { continue }
                    if !part.isProbe { counters.ended(part.length, isWrite: part.isWrite, succeeded: false) }
                    finished.append(FinishedPart(parent: part.parent, status: TE_ERR_IO, bytes: 0,
                                                 error: "\(part.isWrite ? "fi_write" : "fi_read") of \(part.length) bytes on \(name) failed: \(text) (provider errno \(failure.prov_errno))"))
                }
            } else {
                break
            }
        }
        let now = monotonicNanoseconds()
        if timeoutNanoseconds > 0 && (freeSlots.count < capacity || backlogHead < backlog.count) && now - lastTimeoutScan > 50_000_000 {
            lastTimeoutScan = now
            failOverdue(now: now, &finished)
        }
        while backlogHead < backlog.count && !freeSlots.isEmpty {
            let part = backlog[backlogHead]
            if let failure = post(part) {
                if failure == efa_err_again() { break }
                finished.append(fail(part, failure))
            }
            backlogHead += 1
            worked = true
        }
        if backlogHead == backlog.count {
            backlog.removeAll(keepingCapacity: true)
            backlogHead = 0
        } else if backlogHead > 1024 && backlogHead * 2 > backlog.count {
            backlog.removeFirst(backlogHead)
            backlogHead = 0
        }
        return worked
    }

    /// Frees a slot after its completion; false when the operation was already reported as timed out.
    private func release(_ slot: Int) -> Bool {
        let reported = !slotAbandoned[slot]
        slotAbandoned[slot] = false
        slotPostedAt[slot] = 0
        freeSlots.append(Int32(slot))
        return reported
    }

    /// Reports operations older than the timeout as failed (a dead peer never completes them on
    /// software providers). Their slots stay taken until libfabric gives the context back. Lock held.
    private func failOverdue(now: UInt64, _ finished: inout [FinishedPart]) {
        var expired = 0
        for slot in 0..<capacity where slotPostedAt[slot] != 0 && !slotAbandoned[slot] && now - slotPostedAt[slot] > timeoutNanoseconds {
            slotAbandoned[slot] = true
            expired += 1
            let part = slotParts[slot]
            if !part.isProbe { counters.ended(part.length, isWrite: part.isWrite, succeeded: false) }
            finished.append(FinishedPart(parent: part.parent, status: TE_ERR_TIMEOUT, bytes: 0,
                                         error: "\(part.isWrite ? "fi_write" : "fi_read") of \(part.length) bytes on \(name) did not complete in \(timeoutNanoseconds / 1_000_000) ms (peer gone?)"))
        }
        // Parts the endpoint kept refusing (FI_EAGAIN towards a dead peer) or that wait behind
        // timed-out operations fail the same way.
        if backlogHead < backlog.count && (expired > 0 && freeSlots.isEmpty || now - backlog[backlogHead].queuedAt > timeoutNanoseconds) {
            for part in backlog[backlogHead...] {
                if !part.isProbe { counters.failed() }
                finished.append(FinishedPart(parent: part.parent, status: TE_ERR_TIMEOUT, bytes: 0,
                                             error: "\(part.isWrite ? "fi_write" : "fi_read") of \(part.length) bytes on \(name) could not be posted in \(timeoutNanoseconds / 1_000_000) ms (peer gone?)"))
            }
            backlog.removeAll(keepingCapacity: true)
            backlogHead = 0
        }
    }

    /// Drives the endpoint: spins briefly after activity, then sleeps on the
    /// completion queue's fd (or a short timer when the provider has none).
    private func progressLoop() {
        var lastActivity = monotonicNanoseconds()
        let canWait = efa_can_wait(handle) != 0
        while true {
            var finished: [FinishedPart] = []
            let (stop, worked, busy) = lock.locked { () -> (Bool, Bool, Bool) in
                if stopping { return (true, false, false) }
                let worked = progressLocked(&finished)
                return (false, worked, freeSlots.count < capacity || backlogHead < backlog.count)
            }
            if !finished.isEmpty { onFinished(finished) }
            if stop { break }
            let now = monotonicNanoseconds()
            if worked { lastActivity = now; continue }
            if now - lastActivity < spinNanoseconds { sched_yield(); continue }
            if !canWait && busy { sched_yield(); continue }
            let maySleep = lock.locked { () -> Bool in
                sleeping = !stopping && efa_try_wait(handle) != 0
                return sleeping
            }
            if maySleep {
                // With a wait fd the kernel wakes us; without one a short timer bounds a passive peer's wait.
                _ = efa_sleep(handle, canWait ? 100 : 1)
                lock.locked { sleeping = false }
            }
        }
        lock.locked { running = false; lock.broadcast() }
    }
}
