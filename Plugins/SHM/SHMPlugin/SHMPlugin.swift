import CSHMShim
import CTransportABI
import TransportPluginKit
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The shm transport: same-host transfers with one copy through cross-memory
// attach (process_vm_readv/writev), no shared-memory setup and no privileges
// beyond what the kernel grants between processes of one user.
// A peer counts as local only when its boot id, pid namespace and network
// namespace all equal ours; for any other peer open_peer answers
// TE_ERR_PEER_UNREACHABLE and the host uses TCP for it.

/// Identity of "this host" as the plugin sees it.
enum HostIdentity {
    static func namespace(_ kind: String) -> String {
        var info = stat()
        return stat("/proc/self/ns/\(kind)", &info) == 0 ? String(info.st_ino) : "?"
    }

    /// boot id / pid namespace / network namespace.
    static let current: String? = BootID.read("/proc/sys/kernel/random/boot_id").map { "\($0)/\(namespace("pid"))/\(namespace("net"))" }
}

/// One plugin instance.
final class SHMInstance: TransportInstance, @unchecked Sendable {
    /// Bytes copied each way, copies running, and failed copies: the `stats` figures.
    let counters = DeviceCounters(name: "shm")
    /// A peer buffer, with the memfd behind it when the peer allocated it from this plugin.
    struct PeerBuffer {
        var address: UInt64
        var length: UInt64
        var memfd: (fd: Int32, inode: UInt64, offset: UInt64, size: UInt64)?
        /// Where the memfd is mapped here, once it is.
        var mappedBase: UInt64?
        /// The buffer's access word in the peer's table and the generation it was exposed at.
        var slot: Int?
        var generation: UInt32 = 0
    }
    struct Peer {
        var pid: pid_t
        var buffers: [PeerBuffer]
        /// pidfd of the peer (-1 when the kernel has none): mapped memory outlives its owner, so
        /// copies into a mapping check that the owner still runs.
        var pidfd: Int32
        /// The peer's access table, mapped here.
        var access: UnsafeMutablePointer<UInt64>
    }
    struct Work {
        var request: te_request
        var pid: pid_t
        /// Where remote_addr is mapped in this process (memfd buffers), nil for cross-memory attach.
        var mapped: UInt64? = nil
        var pidfd: Int32 = -1
        /// Copy with non-temporal stores (a mapped request over the inline limit, at least
        /// `streamingMinimum` long or in a submit of at least that much).
        var streaming = false
        /// The request this is a piece of, when it was cut for the copy threads.
        var pieces: Pieces? = nil
        /// The target buffer's access word (pinned for the copy) and its generation.
        var accessWord: UnsafeMutablePointer<UInt64>? = nil
        var generation: UInt32 = 0
    }
    /// A request cut into pieces: it completes when its last piece does.
    final class Pieces {
        let cookie: UInt64
        var remaining: Int
        var status = TE_OK
        var bytes: UInt64 = 0
        init(cookie: UInt64, remaining: Int) { self.cookie = cookie; self.remaining = remaining }
    }

    let hostID: String
    /// Guards the state below. The mutex makes each access exclusive, so the hot properties opt
    /// out of Swift's runtime exclusivity checks (a thread-local lookup per access).
    let signal = Signal()
    /// Copy threads wait here for queued work, so an inline copy wakes no idle copy thread
    /// (pollers wait on the signal's main condition).
    private let workQueued: Signal.Condition
    @exclusivity(unchecked) var peers: [UInt64: Peer] = [:]
    @exclusivity(unchecked) var nextPeer: UInt64 = 1
    @exclusivity(unchecked) var queue: [Work] = []
    @exclusivity(unchecked) var queueHead = 0
    @exclusivity(unchecked) var done = CompletionQueue()
    @exclusivity(unchecked) var stopping = false
    @exclusivity(unchecked) var workers = 0
    /// Copies the copy threads are making right now (taken from the queue, not yet completed).
    @exclusivity(unchecked) var copying = 0
    /// pidfds of closed peers that queued or running copies may still check; closed once idle.
    var retiredPidfds: [Int32] = []
    /// Managed buffers this engine allocated as memfds, by address.
    var allocations: [UInt64: (fd: Int32, length: UInt64, inode: UInt64)] = [:]
    /// Peers' memfds mapped here: "pid:fd:inode" -> (address, size).
    var mappings: [String: (address: UInt64, size: UInt64)] = [:]
    let host: HostServices
    /// Where this process answers ownership proofs: a peer that opens us writes nothing until it
    /// has read, from the pid our descriptor names, a nonce it sent us at this address.
    let proofs = ProofSlots()
    /// Mapped requests at least this long are copied with non-temporal stores (MC_SHM_STREAMING_MIN).
    let streamingMinimum: UInt64
    /// This engine's access words, which peers check before every copy.
    let access: AccessTable

    init(hostID: String, host: HostServices, workerCount: Int, streamingMinimum: UInt64, access: AccessTable) {
        workQueued = signal.makeCondition()
        self.hostID = hostID
        self.access = access
        self.host = host
        self.streamingMinimum = streamingMinimum
        for _ in 0..<workerCount { startWorker() }
    }

    func log(_ level: Int32, _ text: String) { host.log(level, text) }

    /// Wakes one copy thread (`all`: every one); caller holds the lock.
    func wakeWorkers(all: Bool = false) { if all { workQueued.broadcast() } else { workQueued.signal() } }

    private func startWorker() {
        signal.locked { workers += 1 }
        if !startThread(name: "te-shm-copy", { [self] in workerLoop() }) { signal.locked { workers -= 1 } }
    }

    /// Copies one request with process_vm_*; the target side is never involved.
    private func workerLoop() {
        while true {
            let work: Work? = signal.locked {
                while queueHead >= queue.count && !stopping { workQueued.wait() }
                if stopping && queueHead >= queue.count { return nil }
                let item = queue[queueHead]
                queueHead += 1
                copying += 1
                if queueHead > 4096 && queueHead * 2 > queue.count { queue.removeFirst(queueHead); queueHead = 0 }
                return item
            }
            guard let work else {
                signal.locked { workers -= 1; signal.broadcast() }
                return
            }
            let completion = copy(work)
            signal.locked {
                copying -= 1
                defer { closeRetiredIfIdle() }
                guard let pieces = work.pieces else {
                    done.append(completion)
                    signal.broadcast()
                    return
                }
                pieces.bytes += completion.bytes
                if completion.status != TE_OK && pieces.status == TE_OK { pieces.status = completion.status }
                pieces.remaining -= 1
                if pieces.remaining == 0 {
                    done.append(te_completion(cookie: pieces.cookie, status: pieces.status, flags: 0, bytes: pieces.bytes))
                    signal.broadcast()
                }
            }
        }
    }

    /// Requests up to this size are copied inside submit.
    static let inlineLimit: UInt64 = 64 << 10
    /// Larger requests are cut into pieces of this size, so every copy thread takes a share.
    static let pieceSize: UInt64 = 1 << 20
    /// Default for MC_SHM_STREAMING_MIN: below it a block and its copy likely stay in cache, where
    /// ordinary stores are several times faster; above it non-temporal stores are (64 MiB measured
    /// here: about 1.5x with two threads).
    static let defaultStreamingMinimum: UInt64 = 8 << 20

    /// Queues a request for the copy threads, in pieces when it is large; caller holds the lock.
    func enqueue(_ work: Work) {
        let length = work.request.length
        // At most pieceSize, and at least one piece per copy thread (in 64-byte lines).
        let size = min(SHMInstance.pieceSize, max(256 << 10, (length / UInt64(max(workers, 1)) + 63) & ~63))
        guard length > size else { queue.append(work); return }
        let count = Int((length - 1) / size + 1)
        let pieces = Pieces(cookie: work.request.cookie, remaining: count)
        for k in 0..<UInt64(count) {
            let offset = k * size
            var piece = work
            piece.request.local_addr += offset
            piece.request.remote_addr += offset
            piece.request.length = min(size, length - offset)
            piece.mapped = work.mapped.map { $0 + offset }
            piece.pieces = pieces
            queue.append(piece)
        }
    }

    /// Performs one copy, counted in the `stats` figures (one device, "shm").
    func copy(_ work: Work) -> te_completion {
        counters.started(work.request.length)
        let completion = copyUncounted(work)
        counters.ended(work.request.length, isWrite: work.request.opcode == TE_OP_WRITE,
                       succeeded: completion.status == TE_OK && completion.bytes == work.request.length)
        return completion
    }

    /// Copies through the peer's mapped memfd, else with process_vm_* (the target process is not
    /// involved either way).
    private func copyUncounted(_ work: Work) -> te_completion {
        let r = work.request
        // Only while the owner exposes the buffer (an unregister refuses peers from then on).
        if let word = work.accessWord {
            guard shm_slot_pin(word, work.generation) == 1 else {
                log(TE_LOG_DEBUG, "shm plugin: pid \(work.pid) no longer exposes [0x\(String(r.remote_addr, radix: 16)), +\(r.length)) (unregistered)")
                return te_completion(cookie: r.cookie, status: TE_ERR_OUT_OF_RANGE, flags: 0, bytes: 0)
            }
        }
        defer { if let word = work.accessWord { shm_slot_unpin(word, work.generation) } }
        // The owner must still run: its mapping outlives it, and its pid may be reused.
        guard work.pidfd < 0 || shm_pidfd_exited(work.pidfd) == 0 else {
            log(TE_LOG_DEBUG, "shm plugin: pid \(work.pid) has exited")
            return te_completion(cookie: r.cookie, status: TE_ERR_PEER_UNREACHABLE, flags: 0, bytes: 0)
        }
        if let target = work.mapped {
            let local = UnsafeMutableRawPointer(bitPattern: UInt(r.local_addr))!, remote = UnsafeMutableRawPointer(bitPattern: UInt(target))!
            let (destination, source) = r.opcode == TE_OP_WRITE ? (remote, UnsafeRawPointer(local)) : (local, UnsafeRawPointer(remote))
            if work.streaming { shm_copy_streaming(destination, source, r.length) } else { shm_copy(destination, source, r.length) }
            return te_completion(cookie: r.cookie, status: TE_OK, flags: 0, bytes: r.length)
        }
        let moved = r.opcode == TE_OP_WRITE
            ? shm_write_to(work.pid, r.local_addr, r.remote_addr, r.length)
            : shm_read_from(work.pid, r.local_addr, r.remote_addr, r.length)
        var status = TE_OK
        if moved < 0 {
            status = moved == -Int64(ESRCH) ? TE_ERR_PEER_UNREACHABLE : TE_ERR_IO
            log(TE_LOG_DEBUG, "shm plugin: process_vm \(r.opcode == TE_OP_WRITE ? "write" : "read") of \(r.length) bytes to pid \(work.pid): \(String(cString: strerror(Int32(-moved))))")
        }
        return te_completion(cookie: r.cookie, status: status, flags: 0, bytes: moved > 0 ? UInt64(moved) : 0)
    }

    func stop() {
        signal.locked {
            stopping = true
            signal.broadcast()
            wakeWorkers(all: true)
            while workers > 0 { signal.waitForever() }
            // Peers' mappings go; this engine's own memfd buffers stay mapped (the application may still use them).
            for (_, mapping) in mappings { _ = shm_unmap(UnsafeMutableRawPointer(bitPattern: UInt(mapping.address)), mapping.size) }
            mappings.removeAll()
            for (_, peer) in peers where peer.pidfd >= 0 { _ = shm_close(peer.pidfd) }
            peers.removeAll()
            for fd in retiredPidfds { _ = shm_close(fd) }
            retiredPidfds.removeAll()
        }
        access.close()
    }

    /// Closes the pidfds of closed peers once no copy is queued or running (one might still check
    /// its owner through it); caller holds the lock.
    func closeRetiredIfIdle() {
        guard !retiredPidfds.isEmpty, copying == 0, queueHead >= queue.count else { return }
        for fd in retiredPidfds { _ = shm_close(fd) }
        retiredPidfds.removeAll()
    }

    /// Where a peer's memfd buffer is mapped here (mapping it on first use); caller holds the lock.
    func mapping(pid: pid_t, _ memfd: (fd: Int32, inode: UInt64, offset: UInt64, size: UInt64)) -> UInt64? {
        let key = "\(pid):\(memfd.fd):\(memfd.inode)"
        if let known = mappings[key] { return known.address }
        var address: UnsafeMutableRawPointer?
        guard shm_map_peer(pid, memfd.fd, memfd.size, memfd.inode, &address) == 0, let address else { return nil }
        let base = UInt64(UInt(bitPattern: address))
        mappings[key] = (base, memfd.size)
        return base
    }
}
