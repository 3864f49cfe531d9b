import CRDMAShim
import CTransportABI
import TransportPluginKit
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One opened HCA port: protection domain, completion queue + channel, the
/// endpoints on it, a table of posted work requests (wr_id = slot), a backlog
/// of slices waiting for send-queue room, and a completion thread that polls
/// briefly and then sleeps on the completion channel.
final class RDMADevice: @unchecked Sendable {
    let index: Int
    let name: String
    let handle: OpaquePointer
    let discovered: DiscoveredDevice
    let options: RDMAOptions
    let mtu: UInt32

    /// Guards the state below; the properties opt out of runtime exclusivity checks, as the
    /// instance's do.
    let lock = Signal()
    private struct Slot {
        var part: Part
        var endpoint: Endpoint
        var queuePair: Int
        var postedAt: UInt64
    }
    @exclusivity(unchecked) private var slots: [Slot?]
    @exclusivity(unchecked) private var freeSlots: [Int]
    @exclusivity(unchecked) private var backlog: [Part] = []
    @exclusivity(unchecked) private var backlogHead = 0
    /// Connections by peer NIC path (active and passive ones).
    @exclusivity(unchecked) var connections: [String: Connection] = [:]
    /// Peer NIC paths an endpoint is being established to now (see `establishing`).
    @exclusivity(unchecked) var connecting: Set<String> = []
    @exclusivity(unchecked) var retired: [Endpoint] = []
    @exclusivity(unchecked) private var lastTimeoutScan: UInt64 = 0
    /// When a caller last polled (0: none since the last blocking poll), and how many of its
    /// polls in a row came within `MC_RDMA_CALLER_POLL_US` of the one before: one poll (a batch's
    /// single look) is not a caller that keeps polling. Atomics, written without the lock: every
    /// poll counts, also one that finds the completion already reaped or the lock taken; a
    /// caller seen only when it got the lock lost the CQ to the completion thread for good once
    /// they shared a CPU (the thread, woken by each completion's event, reaped it first).
    private let callerPolledAt = Atomic<UInt64>(0)
    private let callerStreak = Atomic<Int>(0)
    @exclusivity(unchecked) private var stopping = false
    @exclusivity(unchecked) private var running = false
    @exclusivity(unchecked) private var completions = [rdma_completion](repeating: rdma_completion(), count: 32)
    private let onFinished: ([FinishedPart]) -> Void
    /// Bytes and errors for the ABI's `stats` (a slice counts as in flight from the reservation of
    /// its slot, made under the lock before the post, to its completion).
    let counters: DeviceCounters

    init(index: Int, handle: OpaquePointer, discovered: DiscoveredDevice, options: RDMAOptions, capacity: Int,
         onFinished: @escaping ([FinishedPart]) -> Void) {
        self.index = index
        self.handle = handle
        self.discovered = discovered
        self.options = options
        name = discovered.name
        mtu = min(RDMAOptions.mtuEnum(bytes: options.mtu), discovered.info.active_mtu == 0 ? 5 : discovered.info.active_mtu)
        slots = Array(repeating: nil, count: capacity)
        freeSlots = Array((0..<capacity).reversed())
        self.onFinished = onFinished
        counters = DeviceCounters(name: discovered.name)
    }

    var gidBytes: [UInt8] { withUnsafeBytes(of: discovered.gid.raw) { Array($0) } }

    func start() -> Bool {
        lock.locked { running = true }
        let started = startThread(name: "te-rdma-cq\(index)") { [self] in completionLoop() }
        if !started { lock.locked { running = false } }
        return started
    }

    /// Stops the completion thread and releases the QPs, CQ and device.
    func close() {
        lock.locked { stopping = true; lock.broadcast() }
        rdma_wake(handle)
        lock.locked { while running { lock.wait(nanoseconds: 10_000_000) } }
        lock.locked {
            for connection in connections.values { connection.current.destroy() }
            for endpoint in retired { endpoint.destroy() }
            connections.removeAll()
            retired.removeAll()
        }
        rdma_close(handle)
    }

    /// Queues slices and posts them one at a time, each outside the lock, until the backlog is
    /// empty or the send queues are full. The completion thread does the same as completions
    /// come in, so two threads post at once: on soft-RoCE a post runs the whole exchange inside
    /// the system call (milliseconds for 64 KiB under emulation), and posting under the lock
    /// left all that work to one CPU. The completion thread is not woken here: it sleeps only
    /// with the CQ armed, so the completions of this work wake it (a wake-up per submit cost a
    /// thread switch on the CPUs soft-RoCE needs).
    func enqueue(_ parts: [Part]) {
        if parts.count == 1 { return enqueue(parts[0]) }
        var finished: [FinishedPart] = []
        lock.locked { backlog.append(contentsOf: parts) }
        postBacklog(&finished)
        if !finished.isEmpty { onFinished(finished) }
    }

    /// Queues one slice (a small synchronous transfer): straight to its QP unless others wait.
    func enqueue(_ part: Part) {
        var finished: [FinishedPart] = []
        let reserved = lock.locked { () -> Reserved? in
            guard backlogHead == backlog.count else { backlog.append(part); return nil }
            switch reserveLocked(part) {
            case .reserved(let reserved): return reserved
            case .full: backlog.append(part)
            case .failed(let result): finished.append(result)
            }
            return nil
        }
        if let reserved { _ = post(reserved, finished: &finished) } else { postBacklog(&finished) }
        if !finished.isEmpty { onFinished(finished) }
    }

    /// Posts waiting slices one at a time until none is left or the send queues are full.
    private func postBacklog(_ finished: inout [FinishedPart]) {
        while let next = lock.locked({ nextFromBacklogLocked(&finished) }) {
            if !post(next, finished: &finished) { break }
        }
    }

    /// A caller polled without waiting (a synchronous transfer): it will come back soon, so the
    /// completion thread may leave this CQ to it.
    func callerPolled() {
        let now = monotonicNanoseconds()
        let last = callerPolledAt.load(ordering: .relaxed)
        let streak = last != 0 && now &- last < options.callerWindowNanoseconds ? callerStreak.load(ordering: .relaxed) + 1 : 1
        callerStreak.store(min(streak, 1 << 20), ordering: .relaxed)
        callerPolledAt.store(now, ordering: .relaxed)
    }

    /// Whether a caller keeps polling this CQ (two polls or more in a row, the last one within
    /// the window).
    var callerPolling: Bool {
        let window = options.callerWindowNanoseconds
        return window > 0 && callerStreak.load(ordering: .relaxed) >= 2
            && monotonicNanoseconds() &- callerPolledAt.load(ordering: .relaxed) < window
    }

    /// Reaps completions on the caller's thread if no one else is.
    func tryProgress() {
        var finished: [FinishedPart] = []
        var next: Reserved? = nil
        _ = lock.tryLocked { progressLocked(&finished, &next) }
        if let next { _ = post(next, finished: &finished) }
        if !finished.isEmpty { onFinished(finished) }
    }

    /// A caller that kept polling waits for a completion now: it sleeps on the CQ's channel
    /// itself, at most `nanoseconds`, and the completion thread naps on (waking it would be a
    /// second wake-up and a hand-off of the completion, and it re-armed the CQ, so the caller's
    /// later completions raised events that woke it again: under emulation, with both threads on
    /// one CPU, that cascade doubled a 4 KiB write's time).
    func waitAsCaller(nanoseconds: UInt64) {
        var finished: [FinishedPart] = []
        var next: Reserved? = nil
        // Armed before the last look: a completion after it raises the event slept on below.
        let found = lock.locked { () -> Bool in
            _ = rdma_arm(handle)
            return progressLocked(&finished, &next)
        }
        if !found {
            _ = rdma_wait_event(handle, Int64(clamping: max(nanoseconds / 1000, 1)))
            _ = lock.locked { progressLocked(&finished, &next) }
        }
        if let next { _ = post(next, finished: &finished) }
        callerPolled()
        if !finished.isEmpty { onFinished(finished) }
    }

    /// A caller is about to wait for completions instead of polling: a completion thread napping
    /// because of it goes back to the armed CQ now. (Under the lock: the thread decides to nap
    /// and starts waiting under it, so this cannot slip between the two.)
    func callerWaits() {
        guard callerPolledAt.load(ordering: .relaxed) != 0 else { return }
        lock.locked {
            callerPolledAt.store(0, ordering: .relaxed)
            callerStreak.store(0, ordering: .relaxed)
            lock.broadcast()
        }
    }

    /// A slice with its slot and QP taken under the lock, to be posted outside it.
    private struct Reserved {
        var part: Part
        var endpoint: Endpoint
        var queuePair: Int
        var slot: Int
    }

    private enum ReserveResult {
        case reserved(Reserved)
        case full
        case failed(FinishedPart)
    }

    private func failure(_ part: Part, _ text: String, retry: Bool) -> FinishedPart {
        FinishedPart(parent: part.parent, cookie: part.cookie, status: TE_ERR_IO, bytes: 0,
                     error: "RDMA \(part.isWrite ? "WRITE" : "READ") of \(part.length) bytes \(name) -> \(part.connection.peerNicPath): \(text)",
                     retry: retry ? part : nil)
    }

    /// Takes a slot and the least-loaded QP of the connection's endpoint for `part` (counted as
    /// outstanding from now: a retired endpoint is not destroyed under it). Lock held.
    private func reserveLocked(_ part: Part) -> ReserveResult {
        let endpoint = part.connection.current
        if endpoint.broken { return .failed(failure(part, "the endpoint is being rebuilt after an error", retry: true)) }
        guard let slot = freeSlots.last else { return .full }
        var best = -1
        for (i, count) in endpoint.outstanding.enumerated() where count < options.maxWorkRequests && (best < 0 || count < endpoint.outstanding[best]) {
            best = i
        }
        guard best >= 0 else { return .full }
        freeSlots.removeLast()
        endpoint.outstanding[best] += 1
        counters.started(UInt64(part.length))
        slots[slot] = Slot(part: part, endpoint: endpoint, queuePair: best, postedAt: monotonicNanoseconds())
        return .reserved(Reserved(part: part, endpoint: endpoint, queuePair: best, slot: slot))
    }

    /// The next waiting slice, reserved, if the send queues have room. Lock held.
    private func nextFromBacklogLocked(_ finished: inout [FinishedPart]) -> Reserved? {
        while backlogHead < backlog.count {
            switch reserveLocked(backlog[backlogHead]) {
            case .full:
                return nil
            case .reserved(let reserved):
                dropBacklogHeadLocked()
                return reserved
            case .failed(let failed):
                dropBacklogHeadLocked()
                finished.append(failed)
            }
        }
        return nil
    }

    /// Takes the backlog's first slice off, compacting the storage now and then. Lock held.
    private func dropBacklogHeadLocked() {
        backlogHead += 1
        if backlogHead == backlog.count {
            backlog.removeAll(keepingCapacity: true)
            backlogHead = 0
        } else if backlogHead > 1024 && backlogHead * 2 > backlog.count {
            backlog.removeFirst(backlogHead)
            backlogHead = 0
        }
    }

    /// Posts a reserved slice, without the lock (ibv_post_send is thread-safe). Returns false
    /// when the send queue refused it for room (it waits in the backlog again: stop posting).
    private func post(_ reserved: Reserved, finished: inout [FinishedPart]) -> Bool {
        let part = reserved.part
        let status = rdma_post(reserved.endpoint.queuePairs[reserved.queuePair], part.isWrite ? 1 : 0, part.local, part.length, part.lkey,
                               part.remote, part.rkey, UInt64(reserved.slot), 64)
        if status == 0 { return true }
        lock.locked {
            slots[reserved.slot] = nil
            freeSlots.append(reserved.slot)
            reserved.endpoint.outstanding[reserved.queuePair] -= 1
            if status == -ENOMEM {
                counters.withdrawn(UInt64(part.length))
                backlog.append(part)
            } else {
                counters.ended(UInt64(part.length), isWrite: part.isWrite, succeeded: false)
                finished.append(failure(part, "ibv_post_send: \(String(cString: strerror(-status)))", retry: true))
            }
        }
        return status != -ENOMEM
    }

    /// Polls the CQ and reserves the next waiting slice for the caller to post (`next`) once it
    /// has let go of the lock. Lock held. Returns whether anything happened.
    private func progressLocked(_ finished: inout [FinishedPart], _ next: inout Reserved?) -> Bool {
        var worked = false
        while true {
            let n = completions.withUnsafeMutableBufferPointer { rdma_poll(handle, $0.baseAddress, Int32($0.count)) }
            guard n > 0 else { break }
            worked = true
            for completion in completions.prefix(Int(n)) {
                let slotIndex = Int(completion.wr_id)
                guard slotIndex < slots.count, let slot = slots[slotIndex] else { continue }
                slots[slotIndex] = nil
                freeSlots.append(slotIndex)
                slot.endpoint.outstanding[slot.queuePair] -= 1
                counters.ended(UInt64(slot.part.length), isWrite: slot.part.isWrite, succeeded: completion.status == 0)
                if completion.status == 0 {
                    finished.append(FinishedPart(parent: slot.part.parent, cookie: slot.part.cookie, status: TE_OK, bytes: UInt64(slot.part.length), error: nil))
                } else {
                    // The QP is in the error state now; the rest of its work flushes. Rebuild, then retry.
                    slot.endpoint.broken = true
                    let text = String(cString: rdma_wc_status_text(completion.status))
                    finished.append(failure(slot.part, "work completion \(text) (status \(completion.status))", retry: true))
                }
            }
            if n < Int32(completions.count) { break }
        }
        if !retired.isEmpty { reapRetired() }
        // The clock is read only with work in flight (a synchronous caller's reap leaves none).
        if freeSlots.count < slots.count {
            let now = monotonicNanoseconds()
            if now - lastTimeoutScan > 100_000_000 {
                lastTimeoutScan = now
                for case let slot? in slots where now - slot.postedAt > options.sliceTimeoutNanoseconds && !slot.endpoint.broken {
                    // Flush the endpoint: its work completes with errors, which rebuilds it and retries the slices.
                    slot.endpoint.broken = true
                    for qp in slot.endpoint.queuePairs { _ = rdma_qp_to_error(qp) }
                    worked = true
                }
            }
        }
        let failedBefore = finished.count
        if next == nil, let reserved = nextFromBacklogLocked(&finished) {
            next = reserved
            worked = true
        }
        return worked || finished.count > failedBefore
    }

    /// Polls while busy or briefly after activity, then arms the CQ and sleeps on the channel:
    /// a spinning poller would starve soft-RoCE, whose "NIC" is kernel work on the same CPUs.
    /// While a synchronous caller polls the CQ itself, it naps instead, leaving the CQ unarmed.
    private func completionLoop() {
        var lastActivity = monotonicNanoseconds()
        while true {
            // A synchronous caller polls the CQ itself: leave it unarmed, so its completions wake
            // no thread (under emulation one wake-up costs about what a 4 KiB write does), and do
            // not reap them either, also when an event woke this thread (the CQ was armed when
            // the caller began): a completion taken from under the caller is a hand-off. One that
            // starts waiting (any blocking poll) ends the nap, so it can be long.
            let napped = lock.locked { () -> Bool? in
                if stopping { return nil }
                guard callerPolling else { return false }
                lock.wait(nanoseconds: 100_000_000)
                return true
            }
            guard let napped else { break }
            if napped { continue }
            var finished: [FinishedPart] = []
            var next: Reserved? = nil
            let worked = lock.locked { progressLocked(&finished, &next) }
            if let next { _ = post(next, finished: &finished) }
            if !finished.isEmpty { onFinished(finished) }
            let now = monotonicNanoseconds()
            if worked { lastActivity = now; continue }
            if now - lastActivity < options.spinNanoseconds { sched_yield(); continue }
            _ = rdma_arm(handle)
            // A completion that arrived before arming raised no event: poll once more, then sleep.
            finished.removeAll()
            var nextAfterArming: Reserved? = nil
            let missed = lock.locked { progressLocked(&finished, &nextAfterArming) }
            if let nextAfterArming { _ = post(nextAfterArming, finished: &finished) }
            if !finished.isEmpty { onFinished(finished) }
            if missed { lastActivity = monotonicNanoseconds(); continue }
            _ = rdma_sleep(handle, 100)
        }
        lock.locked { running = false; lock.broadcast() }
    }
}
