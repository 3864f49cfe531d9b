import CSHMShim
import CTransportABI
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The shm plugin's C vtable: each entry unwraps the instance and calls into it.

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    for (i, byte) in bytes.enumerated() { data[i] = CChar(bitPattern: byte) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> SHMInstance? {
    pointer.map { Unmanaged<SHMInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

private func shmProbe(_ options: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard HostIdentity.current != nil else {
        _ = write("cannot read /proc/sys/kernel/random/boot_id to identify this host", reason)
        _ = write("mount /proc", hint)
        return TE_ERR_HARDWARE_ABSENT
    }
    // Cross-memory attach on ourselves shows whether the kernel allows it at all.
    var source: UInt64 = 0x5348_4D5F_4F4B_2121, target: UInt64 = 0
    let moved = withUnsafePointer(to: &source) { s in
        withUnsafeMutablePointer(to: &target) { t in
            shm_read_from(shm_getpid(), UInt64(UInt(bitPattern: t)), UInt64(UInt(bitPattern: s)), 8)
        }
    }
    guard moved == 8, target == source else {
        _ = write("process_vm_readv is not permitted here (\(String(cString: strerror(Int32(-moved)))))", reason)
        _ = write("the kernel must allow cross-memory attach between processes of one user (CONFIG_CROSS_MEMORY_ATTACH, ptrace policy)", hint)
        return TE_ERR_HARDWARE_ABSENT
    }
    _ = write("same-host transfers through process_vm_readv/writev", reason)
    _ = write("", hint)
    return TE_OK
}

private func shmCreate(_ options: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out, let hostID = HostIdentity.current else { return TE_ERR_INVALID_ARGUMENT }
    // Let peers of this user attach even where Yama restricts ptrace to descendants.
    shm_allow_attach()
    let workers = Int(getenv("MC_SHM_WORKERS").flatMap { Int(String(cString: $0)) } ?? 2)
    let streaming = getenv("MC_SHM_STREAMING_MIN").flatMap { UInt64(String(cString: $0)) } ?? SHMInstance.defaultStreamingMinimum
    guard let access = AccessTable() else { return TE_ERR_NO_RESOURCES }
    let object = SHMInstance(hostID: hostID, host: host, workerCount: min(max(workers, 1), 16), streamingMinimum: streaming, access: access)
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    object.log(TE_LOG_INFO, "shm plugin: host \(hostID), pid \(shm_getpid())")
    return TE_OK
}

private func shmDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<SHMInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().stop()
    object.release()
}

private func shmLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    let table = object.access
    return write("{\"shm_host_id\":\"\(object.hostID)\",\"shm_pid\":\(shm_getpid()),\"shm_access_fd\":\(table.fd),\"shm_access_inode\":\(table.inode),\"shm_access_size\":\(table.size)}", out)
}

private func shmRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    // A buffer inside one of our memfds can be mapped by peers; any other needs no keys (cross-memory attach).
    let owner = object.signal.locked {
        object.allocations.first { address >= $0.key && address - $0.key <= $0.value.length && length <= $0.value.length - (address - $0.key) }
    }
    var fields: [String] = []
    let exposed = object.access.expose(address: address)
    if let exposed {
        fields.append("\"shm_slot\":\(exposed.slot),\"shm_slot_gen\":\(exposed.generation)")
    } else if object.access.firstTimeFull() {
        object.log(TE_LOG_WARNING, "shm plugin: all \(AccessTable.slots) access slots are in use; buffers registered from now on are reached over another transport")
    }
    if let (base, memfd) = owner {
        fields.append("\"shm_memfd\":\(memfd.fd),\"shm_memfd_inode\":\(memfd.inode),\"shm_memfd_offset\":\(address - base),\"shm_memfd_size\":\(memfd.length)")
    }
    let status = write("{" + fields.joined(separator: ",") + "}", out)
    // A buffer too small for the answer: the host asks again, which must not expose it twice.
    if status != TE_OK, exposed != nil { _ = object.access.conceal(address: address) }
    return status
}

/// Managed buffers are memfds, so same-host peers can map them and copy with memcpy.
private func shmAllocate(_ pointer: OpaquePointer?, _ length: UInt64, _ location: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let out, length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    var fd: Int32 = -1, inode: UInt64 = 0
    var address: UnsafeMutableRawPointer?
    let status = shm_memfd_alloc(length, &fd, &address, &inode)
    guard status == 0, let address else {
        object.setError("memfd of \(length) bytes: \(String(cString: strerror(-status)))")
        return TE_ERR_NO_RESOURCES
    }
    let base = UInt64(UInt(bitPattern: address))
    object.signal.locked { object.allocations[base] = (fd, length, inode) }
    out.pointee = base
    return TE_OK
}

private func shmFree(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer), let memfd = object.signal.locked({ object.allocations.removeValue(forKey: address) }) else {
        return TE_ERR_INVALID_ARGUMENT
    }
    _ = shm_unmap(UnsafeMutableRawPointer(bitPattern: UInt(address)), memfd.length)
    _ = shm_close(memfd.fd)
    return TE_OK
}

/// Revokes peers' access: from now on they are refused, and copies in flight are waited for.
private func shmUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    if let stuck = object.access.conceal(address: address), stuck > 0 {
        object.log(TE_LOG_WARNING, "shm plugin: \(stuck) copies by peers into 0x\(String(address, radix: 16)) were still counted \(AccessTable.graceNs / 1_000_000_000) s after it was unregistered (a peer died mid-copy?); it is no longer exposed")
    }
    return TE_OK
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

private func shmOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let name = segment.map { String(cString: $0) } ?? "?"
    guard let peer = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(String(cString: descriptor).utf8)) else {
        object.setError("\(name): malformed segment descriptor")
        return TE_ERR_INVALID_ARGUMENT
    }
    guard let hostID = peer.shm_host_id, hostID == object.hostID, let pid = peer.shm_pid, pid > 0 else {
        object.setError("\(name) is not on this host (or does not run the shm transport)")
        return TE_ERR_PEER_UNREACHABLE
    }
    // A descriptor is the peer's word: the pid must be the peer's own process, proven before any
    // byte moves (else a descriptor naming another same-user process, or ours, would aim our
    // writes at it), and held by a pidfd opened before the proof (a reused pid cannot stand in).
    guard pid != shm_getpid() else {
        object.setError("\(name) names this process (pid \(pid)) as its owner: refused")
        return TE_ERR_REJECTED
    }
    let pidfd = shm_pidfd_open(pid)
    if let failure = object.proveOwnership(of: name, pid: pid) {
        if pidfd >= 0 { _ = shm_close(pidfd) }
        object.setError("\(name): pid \(pid) did not prove to be the peer: \(failure)")
        return TE_ERR_REJECTED
    }
    guard let accessFD = peer.shm_access_fd, let accessInode = peer.shm_access_inode, let accessSize = peer.shm_access_size,
          accessSize >= 8, accessSize <= 1 << 20, accessSize % 8 == 0 else {
        if pidfd >= 0 { _ = shm_close(pidfd) }
        object.setError("\(name) publishes no shm access table (an engine of an earlier version)")
        return TE_ERR_PEER_UNREACHABLE
    }
    let buffers = (peer.buffers ?? []).map { buffer in
        var entry = SHMInstance.PeerBuffer(address: buffer.addr, length: buffer.length)
        if let slot = buffer.shm_slot, let generation = buffer.shm_slot_gen, slot >= 0, UInt64(slot) < accessSize / 8 {
            (entry.slot, entry.generation) = (slot, generation)
        }
        if let fd = buffer.shm_memfd, let inode = buffer.shm_memfd_inode, let offset = buffer.shm_memfd_offset, let size = buffer.shm_memfd_size,
           offset <= size, buffer.length <= size - offset {
            entry.memfd = (fd, inode, offset, size)
        }
        return entry
    }
    let handle: UInt64? = object.signal.locked {
        guard let table = object.mapping(pid: pid, (accessFD, accessInode, 0, accessSize)) else { return nil }
        let handle = object.nextPeer
        object.nextPeer += 1
        object.peers[handle] = SHMInstance.Peer(pid: pid, buffers: buffers, pidfd: max(pidfd, -1),
                                                access: UnsafeMutablePointer(bitPattern: UInt(table))!)
        return handle
    }
    guard let handle else {
        if pidfd >= 0 { _ = shm_close(pidfd) }
        object.setError("\(name): cannot map its shm access table (fd \(accessFD) of pid \(pid))")
        return TE_ERR_PEER_UNREACHABLE
    }
    out.pointee = handle
    return TE_OK
}

private func shmClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) {
    guard let object = instance(pointer) else { return }
    object.signal.locked {
        if let closed = object.peers.removeValue(forKey: peer), closed.pidfd >= 0 { _ = shm_close(closed.pidfd) }
    }
}

private func shmOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), let request else { return TE_ERR_INVALID_ARGUMENT }
    // An ownership proof: put the nonce in our memory and say where; the asker reads it back
    // through the pid our descriptor names, which proves that pid is this process.
    if let asked = try? JSONDecoder().decode(ProofRequest.self, from: Data(String(cString: request).utf8)),
       let nonce = JSONHex.decode(asked.shm_proof_nonce), nonce.count == ProofSlots.nonceSize {
        let address = object.proofs.store(nonce)
        return write("{\"reply_msg\":\"\",\"shm_proof_addr\":\(address)}", reply)
    }
    return write("{\"reply_msg\":\"\"}", reply)
}

private func shmSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                       _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    accepted.pointee = 0
    let raw = UnsafeRawPointer(requests)
    // A batch that moves more than the streaming minimum in total leaves the cache as a single
    // large request does (64 x 1 MiB measured 6-10 GB/s with ordinary stores, 64 MiB x1 13).
    var total: UInt64 = 0
    for i in 0..<count { total &+= raw!.loadUnaligned(fromByteOffset: i * stride, as: te_request.self).length }
    var checkedPeer: UInt64? = nil, checkedAlive = false
    return object.signal.locked {
        let doneBefore = object.done.count, queuedBefore = object.queue.count
        defer {
            // Pollers learn of inline completions; copy threads only of queued work (also when a
            // later request was refused and the earlier ones stay accepted).
            if object.done.count > doneBefore { object.signal.broadcast() }
            if object.queue.count > queuedBefore { object.signal.wakeWorkers(all: object.queue.count - queuedBefore > 1) }
        }
        for i in 0..<count {
            let request = raw!.loadUnaligned(fromByteOffset: i * stride, as: te_request.self)
            guard let peer = object.peers[request.peer] else {
                object.setError("unknown peer handle \(request.peer)")
                return TE_ERR_INVALID_ARGUMENT
            }
            // The same bounds rule as TCP: only inside one buffer the peer published.
            let index = peer.buffers.firstIndex { buffer in
                request.length > 0 && request.remote_addr >= buffer.address
                    && request.remote_addr - buffer.address <= buffer.length && request.length <= buffer.length - (request.remote_addr - buffer.address)
            }
            guard let index else {
                object.setError("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is outside the peer's buffers")
                return TE_ERR_OUT_OF_RANGE
            }
            let buffer = peer.buffers[index]
            guard let slot = buffer.slot else {
                object.setError("the peer's buffer at 0x\(String(buffer.address, radix: 16)) has no shm access slot")
                return TE_ERR_OUT_OF_RANGE
            }
            var work = SHMInstance.Work(request: request, pid: peer.pid, pidfd: peer.pidfd, accessWord: peer.access + slot,
                                        generation: buffer.generation)
            if let memfd = buffer.memfd {
                // The mapping is looked up once per peer buffer, then remembered in it.
                let base = buffer.mappedBase ?? object.mapping(pid: peer.pid, memfd)
                if let base {
                    if buffer.mappedBase == nil { object.peers[request.peer]?.buffers[index].mappedBase = base }
                    work.mapped = base + memfd.offset + (request.remote_addr - buffer.address)
                    work.streaming = request.length > SHMInstance.inlineLimit
                        && (request.length >= object.streamingMinimum || total >= object.streamingMinimum)
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
                object.done.append(object.copy(work))
            } else {
                object.enqueue(work)
            }
            accepted.pointee = i + 1
        }
        return TE_OK
    }
}

private func shmPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                     _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    let raw = UnsafeMutableRawPointer(out)
    count.pointee = object.signal.locked {
        if object.done.isEmpty && timeout > 0 { object.signal.wait(nanoseconds: timeout) }
        let n = min(capacity, object.done.count)
        for i in 0..<n { raw!.storeBytes(of: object.done[i], toByteOffset: i * stride, as: te_completion.self) }
        object.done.removeFirst(n)
        return n
    }
    return TE_OK
}

private func shmLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let object = instance(pointer) else { return nil }
    return object.lastErrorText
}

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: UnsafeRawPointer(("shm" as StaticString).utf8Start).assumingMemoryBound(to: CChar.self),
        version: UnsafeRawPointer(("0.1.0" as StaticString).utf8Start).assumingMemoryBound(to: CChar.self),
        protocols: UnsafeRawPointer(("shm" as StaticString).utf8Start).assumingMemoryBound(to: CChar.self),
        capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
        probe: shmProbe, create: shmCreate, destroy: shmDestroy, local_descriptor: shmLocalDescriptor,
        register_memory: shmRegister, unregister_memory: shmUnregister, open_peer: shmOpenPeer, close_peer: shmClosePeer,
        on_handshake: shmOnHandshake, submit: shmSubmit, poll: shmPoll, last_error: shmLastError,
        allocate_memory: shmAllocate, free_memory: shmFree))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
