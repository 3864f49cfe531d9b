import CSHMShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The shm transport as the kit sees it: probe checks cross-memory attach, create starts the copy threads.
enum SHMTransport: TransportPlugin {
    static func probe(options: String?) -> ProbeAnswer {
        guard HostIdentity.current != nil else {
            return .absent("cannot read /proc/sys/kernel/random/boot_id to identify this host", hint: "mount /proc")
        }
        // Cross-memory attach on ourselves shows whether the kernel allows it at all.
        var source: UInt64 = 0x5348_4D5F_4F4B_2121, target: UInt64 = 0
        let moved = withUnsafePointer(to: &source) { s in
            withUnsafeMutablePointer(to: &target) { t in
                shm_read_from(shm_getpid(), UInt64(UInt(bitPattern: t)), UInt64(UInt(bitPattern: s)), 8)
            }
        }
        guard moved == 8, target == source else {
            return .absent("process_vm_readv is not permitted here (\(String(cString: strerror(Int32(-moved)))))",
                           hint: "the kernel must allow cross-memory attach between processes of one user (CONFIG_CROSS_MEMORY_ATTACH, ptrace policy)")
        }
        return .ready("same-host transfers through process_vm_readv/writev")
    }

    static func create(options: String?, host: HostServices) throws(PluginFailure) -> SHMInstance {
        guard let hostID = HostIdentity.current else { throw PluginFailure(TE_ERR_HARDWARE_ABSENT, "shm plugin: cannot identify this host (/proc)") }
        // Let peers of this user attach even where Yama restricts ptrace to descendants.
        shm_allow_attach()
        let workers = Int(getenv("MC_SHM_WORKERS").flatMap { Int(String(cString: $0)) } ?? 2)
        let streaming = getenv("MC_SHM_STREAMING_MIN").flatMap { UInt64(String(cString: $0)) } ?? SHMInstance.defaultStreamingMinimum
        guard let access = AccessTable() else { throw .noResources("shm plugin: cannot create its access table (memfd)") }
        let object = SHMInstance(hostID: hostID, host: host, workerCount: min(max(workers, 1), 16), streamingMinimum: streaming, access: access)
        object.log(TE_LOG_INFO, "shm plugin: host \(hostID), pid \(shm_getpid())")
        return object
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "shm", version: "0.1.0", protocols: "shm",
    capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS, allocatesMemory: true,
    probe: { PluginEntry.probe(SHMTransport.self, $0, $1, $2) },
    create: { PluginEntry.create(SHMTransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }

extension SHMInstance {
    func localDescriptor() -> String {
        "{\"shm_host_id\":\(JSONFragment.string(hostID)),\"shm_pid\":\(shm_getpid()),\"shm_access_fd\":\(access.fd),\"shm_access_inode\":\(access.inode),\"shm_access_size\":\(access.size)}"
    }

    func close() { stop() }
    func stats() -> String? { DeviceCounters.report([counters]) }
    func register(address: UInt64, length: UInt64, location: String) -> String {
        // A buffer inside one of our memfds can be mapped by peers; any other needs no keys (cross-memory attach).
        let owner = signal.locked {
            allocations.first { address >= $0.key && address - $0.key <= $0.value.length && length <= $0.value.length - (address - $0.key) }
        }
        var fields: [String] = []
        if let exposed = access.expose(address: address) {
            fields.append("\"shm_slot\":\(exposed.slot),\"shm_slot_gen\":\(exposed.generation)")
        } else if access.firstTimeFull() {
            log(TE_LOG_WARNING, "shm plugin: all \(AccessTable.slots) access slots are in use; buffers registered from now on are reached over another transport")
        }
        if let (base, memfd) = owner {
            fields.append("\"shm_memfd\":\(memfd.fd),\"shm_memfd_inode\":\(memfd.inode),\"shm_memfd_offset\":\(address - base),\"shm_memfd_size\":\(memfd.length)")
        }
        return "{" + fields.joined(separator: ",") + "}"
    }

    /// Only a register that exposed the buffer (its fragment names the access slot) has anything to undo.
    func registrationNotDelivered(address: UInt64, fragment: String) {
        if fragment.contains("shm_slot") { unregister(address: address) }
    }

    /// Revokes peers' access: from now on they are refused, and copies in flight are waited for.
    func unregister(address: UInt64) {
        if let stuck = access.conceal(address: address), stuck > 0 {
            log(TE_LOG_WARNING, "shm plugin: \(stuck) copies by peers into 0x\(String(address, radix: 16)) were still counted \(AccessTable.graceNs / 1_000_000_000) s after it was unregistered (a peer died mid-copy?); it is no longer exposed")
        }
    }

    /// Managed buffers are memfds, so same-host peers can map them and copy with memcpy.
    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        var fd: Int32 = -1, inode: UInt64 = 0
        var address: UnsafeMutableRawPointer?
        let status = shm_memfd_alloc(length, &fd, &address, &inode)
        guard status == 0, let address else { throw .noResources("memfd of \(length) bytes: \(String(cString: strerror(-status)))") }
        let base = UInt64(UInt(bitPattern: address))
        signal.locked { allocations[base] = (fd, length, inode) }
        return base
    }

    func free(address: UInt64) throws(PluginFailure) {
        guard let memfd = signal.locked({ allocations.removeValue(forKey: address) }) else {
            throw .invalid("0x\(String(address, radix: 16)) is not a memfd buffer of this engine")
        }
        _ = shm_unmap(UnsafeMutableRawPointer(bitPattern: UInt(address)), memfd.length)
        _ = shm_close(memfd.fd)
    }

    func openPeer(segment name: String, descriptor: String) throws(PluginFailure) -> UInt64 {
        guard let peer = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(descriptor.utf8)) else {
            throw .invalid("\(name): malformed segment descriptor")
        }
        guard let hostID = peer.shm_host_id, hostID == self.hostID, let pid = peer.shm_pid, pid > 0 else {
            throw .unreachable("\(name) is not on this host (or does not run the shm transport)")
        }
        // A descriptor is the peer's word: the pid must be the peer's own process, proven before any
        // byte moves (else a descriptor naming another same-user process, or ours, would aim our
        // writes at it), and held by a pidfd opened before the proof (a reused pid cannot stand in).
        guard pid != shm_getpid() else { throw .rejected("\(name) names this process (pid \(pid)) as its owner: refused") }
        let pidfd = shm_pidfd_open(pid)
        if let failure = proveOwnership(of: name, pid: pid) {
            if pidfd >= 0 { _ = shm_close(pidfd) }
            throw .rejected("\(name): pid \(pid) did not prove to be the peer: \(failure)")
        }
        guard let accessFD = peer.shm_access_fd, let accessInode = peer.shm_access_inode, let accessSize = peer.shm_access_size,
              accessSize >= 8, accessSize <= 1 << 20, accessSize % 8 == 0 else {
            if pidfd >= 0 { _ = shm_close(pidfd) }
            throw .unreachable("\(name) publishes no shm access table (an engine of an earlier version)")
        }
        let buffers = (peer.buffers ?? []).map { buffer in
            var entry = PeerBuffer(address: buffer.addr, length: buffer.length)
            if let slot = buffer.shm_slot, let generation = buffer.shm_slot_gen, slot >= 0, UInt64(slot) < accessSize / 8 {
                (entry.slot, entry.generation) = (slot, generation)
            }
            if let fd = buffer.shm_memfd, let inode = buffer.shm_memfd_inode, let offset = buffer.shm_memfd_offset, let size = buffer.shm_memfd_size,
               offset <= size, buffer.length <= size - offset {
                entry.memfd = (fd, inode, offset, size)
            }
            return entry
        }
        let handle: UInt64? = signal.locked {
            guard let table = mapping(pid: pid, (accessFD, accessInode, 0, accessSize)) else { return nil }
            let handle = nextPeer
            nextPeer += 1
            peers[handle] = Peer(pid: pid, buffers: buffers, pidfd: max(pidfd, -1), access: UnsafeMutablePointer(bitPattern: UInt(table))!)
            return handle
        }
        guard let handle else {
            if pidfd >= 0 { _ = shm_close(pidfd) }
            throw .unreachable("\(name): cannot map its shm access table (fd \(accessFD) of pid \(pid))")
        }
        return handle
    }

    /// Forgets a peer. Its pidfd stays open while copies that hold it are queued or running.
    func closePeer(_ handle: UInt64) {
        signal.locked {
            guard let closed = peers.removeValue(forKey: handle), closed.pidfd >= 0 else { return }
            retiredPidfds.append(closed.pidfd)
            closeRetiredIfIdle()
        }
    }

    /// An ownership proof: put the nonce in our memory and say where; the asker reads it back
    /// through the pid our descriptor names, which proves that pid is this process.
    func answerHandshake(_ request: String) -> String {
        if let asked = try? JSONDecoder().decode(ProofRequest.self, from: Data(request.utf8)),
           asked.shm_proof_nonce.utf8.count == 2 * ProofSlots.nonceSize, let nonce = JSONFragment.unhex(asked.shm_proof_nonce) {
            return "{\"reply_msg\":\"\",\"shm_proof_addr\":\(proofs.store(nonce))}"
        }
        return "{\"reply_msg\":\"\"}"
    }

    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        // A batch that moves more than the streaming minimum in total leaves the cache as a single
        // large request does (64 x 1 MiB measured 6-10 GB/s with ordinary stores, 64 MiB x1 13).
        var total: UInt64 = 0
        for request in requests { total &+= request.length }
        var checkedPeer: UInt64? = nil, checkedAlive = false
        signal.lock()
        let doneBefore = done.count, queuedBefore = queue.count
        defer {
            // Pollers learn of inline completions; copy threads only of queued work (also when a
            // later request was refused and the earlier ones stay accepted).
            if done.count > doneBefore { signal.broadcast() }
            if queue.count > queuedBefore { wakeWorkers(all: queue.count - queuedBefore > 1) }
            signal.unlock()
        }
        for (i, request) in requests.enumerated() {
            guard let peer = peers[request.peer] else { throw .invalid("unknown peer handle \(request.peer)") }
            // The same bounds rule as TCP: only inside one buffer the peer published.
            let index = peer.buffers.firstIndex { buffer in
                request.length > 0 && request.remote_addr >= buffer.address
                    && request.remote_addr - buffer.address <= buffer.length && request.length <= buffer.length - (request.remote_addr - buffer.address)
            }
            guard let index else {
                throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is outside the peer's buffers")
            }
            let buffer = peer.buffers[index]
            guard let slot = buffer.slot else {
                throw .outOfRange("the peer's buffer at 0x\(String(buffer.address, radix: 16)) has no shm access slot")
            }
            var work = Work(request: request, pid: peer.pid, pidfd: peer.pidfd, accessWord: peer.access + slot, generation: buffer.generation)
            if let memfd = buffer.memfd {
                // The mapping is looked up once per peer buffer, then remembered in it.
                let base = buffer.mappedBase ?? mapping(pid: peer.pid, memfd)
                if let base {
                    if buffer.mappedBase == nil { peers[request.peer]?.buffers[index].mappedBase = base }
                    work.mapped = base + memfd.offset + (request.remote_addr - buffer.address)
                    work.streaming = request.length > SHMInstance.inlineLimit
                        && (request.length >= streamingMinimum || total >= streamingMinimum)
                }
            }
            if request.length <= SHMInstance.inlineLimit {
                // A small copy costs about a microsecond: do it here rather than hand it to a worker.
                // The owner's liveness (a poll on its pidfd, a system call) is checked once per peer
                // per submit, not per request.
                if work.pidfd >= 0 {
                    if checkedPeer != request.peer { (checkedPeer, checkedAlive) = (request.peer, shm_pidfd_exited(work.pidfd) == 0) }
                    if checkedAlive { work.pidfd = -1 }
                }
                done.append(copy(work))
            } else {
                enqueue(work)
            }
            accepted = i + 1
        }
    }

    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        signal.locked {
            if done.isEmpty && timeout > 0 { signal.wait(nanoseconds: timeout) }
            return done.drain(into: out)
        }
    }
}

/// The fields of a peer descriptor the plugin needs.
private struct PeerDescriptor: Decodable {
    struct Buffer: Decodable {
        var addr: UInt64
        var length: UInt64
        var shm_memfd: Int32?
        var shm_memfd_inode: UInt64?
        var shm_memfd_offset: UInt64?
        var shm_memfd_size: UInt64?
        var shm_slot: Int?
        var shm_slot_gen: UInt32?
    }
    var shm_host_id: String?
    var shm_pid: Int32?
    var shm_access_fd: Int32?
    var shm_access_inode: UInt64?
    var shm_access_size: UInt64?
    var buffers: [Buffer]?
}
