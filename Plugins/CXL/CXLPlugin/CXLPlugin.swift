import CCXLShim
import CTransportABI
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The cxl transport: a shared memory pool (device-dax on CXL memory, or a file
// for local tests) mapped by every engine that uses it. Buffers inside the pool
// are reachable by peers on the same pool: a transfer is a copy between local
// memory and the pool at the peer buffer's offset, ordered with a store fence
// (and cache-line write-back / invalidation with MC_CXL_FLUSH=1).

/// Boot id of this host, part of a file pool's identity.
private let bootID: String = {
    guard let file = fopen("/proc/sys/kernel/random/boot_id", "r") else { return "?" }
    defer { fclose(file) }
    var buffer = [CChar](repeating: 0, count: 64)
    _ = fgets(&buffer, 64, file)
    return String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}()

/// One plugin instance: the mapped pool, its allocator, peers and finished requests.
final class CXLInstance: @unchecked Sendable {
    struct Peer {
        var name: String
        var base: UInt64
        /// The peer's owner word in the pool table: its chunks are reachable only while it exposes them.
        var owner: UInt64
        var buffers: [(address: UInt64, length: UInt64)]
    }

    let base: UInt64
    let size: UInt64
    let fd: Int32
    let poolID: String
    let path: String
    let flush: Bool
    let signal = Signal()
    let table: PoolTable
    private let exposed: ExposedChunks
    private var allocations: [UInt64: UInt64] = [:]
    private var peers: [UInt64: Peer] = [:]
    private var nextPeer: UInt64 = 1
    private var done: [te_completion] = []
    let host: UnsafePointer<te_host_services>?
    private let lastError: UnsafeMutablePointer<CChar> = {
        let storage = UnsafeMutablePointer<CChar>.allocate(capacity: 512)
        storage.initialize(repeating: 0, count: 512)
        return storage
    }()

    init(path: String, base: UInt64, size: UInt64, fd: Int32, poolID: String, flush: Bool, table: PoolTable, host: UnsafePointer<te_host_services>?) {
        self.path = path
        self.base = base
        self.size = size
        self.fd = fd
        self.poolID = poolID
        self.flush = flush
        self.host = host
        self.table = table
        exposed = ExposedChunks(table: table)
    }

    /// Returns this engine's chunks to the pool and unmaps it.
    func close() {
        exposed.forgetAll()
        let held = signal.locked { () -> [UInt64: UInt64] in defer { allocations.removeAll() }; return allocations }
        for (address, length) in held { table.release(address - base, length) }
        cxl_unmap(fd, UnsafeMutableRawPointer(bitPattern: UInt(base)), size)
    }

    func setError(_ text: String) {
        signal.locked {
            let bytes = Array(text.utf8.prefix(511))
            for (i, byte) in bytes.enumerated() { lastError[i] = CChar(bitPattern: byte) }
            lastError[bytes.count] = 0
        }
    }

    var lastErrorText: UnsafePointer<CChar> { UnsafePointer(lastError) }

    func log(_ level: Int32, _ text: String) {
        guard let host, let log = host.pointee.log else { return }
        text.withCString { log(host.pointee.host_context, level, $0) }
    }

    func inPool(_ address: UInt64, _ length: UInt64) -> Bool {
        address >= base && address - base <= size && length <= size - (address - base)
    }

    func allocate(_ length: UInt64) -> UInt64? {
        guard let offset = table.allocate(length) else { return nil }
        signal.locked { allocations[base + offset] = length }
        return base + offset
    }

    func release(_ address: UInt64) -> Bool {
        guard let length = signal.locked({ allocations.removeValue(forKey: address) }) else { return false }
        if let range = table.chunkRange(offset: address - base, length: length) {
            let stuck = exposed.forget(range)
            guard stuck == 0 else {
                // A peer may still be writing there: the chunks stay this engine's (out of the
                // pool) until it exits, when the pool takes them back.
                reportStuck(stuck, address)
                log(TE_LOG_WARNING, "cxl plugin: the chunks of 0x\(String(address, radix: 16)) stay out of the pool until this engine exits")
                return true
            }
        }
        table.release(address - base, length)
        return true
    }

    /// Exposes a registered range of this engine's pool memory to peers; its pool offset, or nil
    /// when peers cannot reach it (outside the pool, or pool memory this engine does not own).
    func register(_ address: UInt64, _ length: UInt64) -> UInt64? {
        guard inPool(address, length), let range = table.chunkRange(offset: address - base, length: length), table.owns(range) else { return nil }
        exposed.register(address: address, range: range)
        return address - base
    }

    /// Conceals an unregistered range from peers once no registration covers it.
    func unregister(_ address: UInt64) { reportStuck(exposed.unregister(address: address), address) }

    private func reportStuck(_ stuck: UInt32, _ address: UInt64) {
        guard stuck > 0 else { return }
        log(TE_LOG_WARNING, "cxl plugin: \(stuck) copies by peers into 0x\(String(address, radix: 16)) were still counted \(ExposedChunks.graceNs / 1_000_000_000) s after it was unregistered (a peer died mid-copy?); the memory is no longer exposed")
    }

    private struct PeerDescriptor: Decodable {
        struct Buffer: Decodable {
            var addr: UInt64
            var length: UInt64
            var cxl_offset: UInt64?
        }
        var cxl_pool: String?
        var cxl_base: UInt64?
        var cxl_owner: UInt64?
        var buffers: [Buffer]?
    }

    func openPeer(_ segment: String, _ json: String) -> (Int32, UInt64) {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(json.utf8)) else {
            setError("\(segment): malformed segment descriptor")
            return (TE_ERR_INVALID_ARGUMENT, 0)
        }
        guard descriptor.cxl_pool == poolID, let peerBase = descriptor.cxl_base else {
            setError("\(segment) uses CXL pool \(descriptor.cxl_pool ?? "none"), this engine \(poolID)")
            return (TE_ERR_PEER_UNREACHABLE, 0)
        }
        guard let owner = descriptor.cxl_owner, owner >> 63 == 1 else {
            setError("\(segment) publishes no cxl_owner (an engine of an earlier pool table layout)")
            return (TE_ERR_PEER_UNREACHABLE, 0)
        }
        // Only buffers inside the peer's pool mapping are reachable through the pool.
        let buffers = (descriptor.buffers ?? []).filter { $0.cxl_offset != nil }.map { (address: $0.addr, length: $0.length) }
        return signal.locked {
            defer { nextPeer += 1 }
            peers[nextPeer] = Peer(name: segment, base: peerBase, owner: owner, buffers: buffers)
            return (TE_OK, nextPeer)
        }
    }

    func closePeer(_ handle: UInt64) { signal.locked { _ = peers.removeValue(forKey: handle) } }

    /// Copies each request at once (memory to memory; nothing to wait for).
    /// Copies are pinned and made in slices of at most this many bytes.
    static let sliceBytes: UInt64 = 8 << 20

    func submit(_ raw: UnsafeRawPointer?, count: Int, stride: Int, accepted: inout Int) -> Int32 {
        accepted = 0
        for i in 0..<count {
            let request = raw!.loadUnaligned(fromByteOffset: i * stride, as: te_request.self)
            guard let peer = signal.locked({ peers[request.peer] }) else { setError("unknown peer handle \(request.peer)"); return TE_ERR_INVALID_ARGUMENT }
            guard request.length > 0, request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE else {
                setError("bad request (opcode \(request.opcode), length \(request.length))")
                return TE_ERR_INVALID_ARGUMENT
            }
            guard peer.buffers.contains(where: { request.remote_addr >= $0.address && request.remote_addr - $0.address <= $0.length
                                                    && request.length <= $0.length - (request.remote_addr - $0.address) }),
                  request.remote_addr >= peer.base, request.remote_addr - peer.base <= size,
                  request.length <= size - (request.remote_addr - peer.base) else {
                setError("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside one of \(peer.name)'s pool buffers")
                return TE_ERR_OUT_OF_RANGE
            }
            // The pool's table never, and a chunk only while its owner exposes it (peers with a
            // descriptor from before an unregister are refused here). Copies go in slices, each
            // pinned on its own, so an unregister waits for one slice at most, never a whole
            // large request (its grace period is bounded).
            let offset = request.remote_addr - peer.base
            var copied: UInt64 = 0
            while copied < request.length {
                let length = min(Self.sliceBytes, request.length - copied)
                guard let chunks = table.chunkRange(offset: offset + copied, length: length), table.pin(chunks, holder: peer.owner) else {
                    setError("remote range [0x\(String(request.remote_addr + copied, radix: 16)), +\(length)) of \(peer.name) is not exposed in the pool (unregistered, or the pool's table)")
                    if copied == 0 { return TE_ERR_OUT_OF_RANGE }
                    break
                }
                defer { table.unpin(chunks) }
                let pool = UnsafeMutableRawPointer(bitPattern: UInt(base + offset + copied))!
                let local = UnsafeMutableRawPointer(bitPattern: UInt(request.local_addr + copied))!
                if request.opcode == TE_OP_WRITE {
                    cxl_copy(pool, local, length, flush ? 1 : 0)
                } else {
                    if flush { cxl_invalidate(pool, length) }
                    cxl_copy(local, pool, length, 0)
                }
                copied += length
            }
            let status = copied == request.length ? TE_OK : TE_ERR_OUT_OF_RANGE
            signal.locked { done.append(te_completion(cookie: request.cookie, status: status, flags: 0, bytes: copied)) }
            accepted = i + 1
        }
        signal.locked { signal.broadcast() }
        return TE_OK
    }

    func poll(into raw: UnsafeMutableRawPointer?, capacity: Int, stride: Int, timeout: UInt64) -> Int {
        signal.locked {
            if done.isEmpty && timeout > 0 { signal.wait(nanoseconds: timeout) }
            let n = min(capacity, done.count)
            for i in 0..<n { raw!.storeBytes(of: done[i], toByteOffset: i * stride, as: te_completion.self) }
            done.removeFirst(n)
            return n
        }
    }
}

// MARK: - Vtable

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    for (i, byte) in bytes.enumerated() { data[i] = CChar(bitPattern: byte) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> CXLInstance? {
    pointer.map { Unmanaged<CXLInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

private func cxlProbe(_ json: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    switch PoolDiscovery.run(CXLOptions(json: json)) {
    case .absent(let why, let fix):
        _ = write(why, reason)
        _ = write(fix, hint)
        return TE_ERR_HARDWARE_ABSENT
    case .found(let path, let size, let align, let dax):
        _ = write("pool \(path) (\(size) bytes, \(align)-byte alignment\(dax.map { ", device-dax \($0)" } ?? ", file"))", reason)
        _ = write("", hint)
        return TE_OK
    }
}

private func cxlCreate(_ json: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return TE_ERR_INVALID_ARGUMENT }
    let options = CXLOptions(json: json)
    guard case .found(let path, let size, let align, let dax) = PoolDiscovery.run(options) else { return TE_ERR_HARDWARE_ABSENT }
    var fd: Int32 = -1
    var base: UnsafeMutableRawPointer?
    let status = cxl_map(path, size, align, &fd, &base)
    guard status == 0, let base else {
        if let host, let log = host.pointee.log {
            "cxl plugin: cannot map \(path): \(String(cString: strerror(-status)))".withCString { log(host.pointee.host_context, TE_LOG_ERROR, $0) }
        }
        return TE_ERR_NO_RESOURCES
    }
    var identity = [CChar](repeating: 0, count: 128)
    _ = cxl_file_identity(fd, &identity, identity.count)
    let id = String(decoding: identity.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    // A device-dax pool is named by its device; a file pool only exists on this host.
    let poolID = dax.map { "dax:\($0):\(size)" } ?? "\(bootID):\(id):\(size)"
    let table: PoolTable
    switch PoolTable.open(base: base, fd: fd, size: size, align: align, bootID: bootID, path: path, isDevice: dax != nil) {
    case .success(let opened): table = opened
    case .failure(let error):
        cxl_unmap(fd, base, size)
        if let host, let log = host.pointee.log { "cxl plugin: \(error.reason)".withCString { log(host.pointee.host_context, TE_LOG_ERROR, $0) } }
        return TE_ERR_NO_RESOURCES
    }
    let object = CXLInstance(path: path, base: UInt64(UInt(bitPattern: base)), size: size, fd: fd, poolID: poolID, flush: options.flush,
                             table: table, host: host)
    object.log(TE_LOG_INFO, "cxl plugin: pool \(path), \(size) bytes mapped at 0x\(String(object.base, radix: 16)) (\(align)-byte alignment), flush \(options.flush ? "on" : "off"), engine slot \(table.slot)")
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    return TE_OK
}

private func cxlDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<CXLInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().close()
    object.release()
}

private func cxlLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return write("{\"cxl_pool\":\"\(object.poolID)\",\"cxl_base\":\(object.base),\"cxl_size\":\(object.size),\"cxl_owner\":\(object.table.owner)}", out)
}

private func cxlRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    // Memory outside the pool can be a local source or destination, but peers cannot reach it.
    let offset = object.register(address, length)
    let status = write(offset.map { "{\"cxl_offset\":\($0)}" } ?? "{}", out)
    // A buffer too small for the answer: the host asks again, which must not expose it twice.
    if status != TE_OK, offset != nil { object.unregister(address) }
    return status
}

private func cxlUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    object.unregister(address)
    return TE_OK
}

private func cxlOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let segment, let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let (status, handle) = object.openPeer(String(cString: segment), String(cString: descriptor))
    out.pointee = handle
    return status
}

private func cxlClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) { instance(pointer)?.closePeer(peer) }

private func cxlOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    write("{\"reply_msg\":\"\"}", reply)
}

private func cxlSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                       _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    var taken = 0
    let status = object.submit(UnsafeRawPointer(requests), count: count, stride: stride, accepted: &taken)
    accepted.pointee = taken
    return status
}

private func cxlPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                     _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    count.pointee = object.poll(into: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride, timeout: timeout)
    return TE_OK
}

private func cxlLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? { instance(pointer)?.lastErrorText }

private func cxlAllocate(_ pointer: OpaquePointer?, _ length: UInt64, _ location: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let out, length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    guard let address = object.allocate(length) else {
        object.setError("the CXL pool (\(object.size) bytes) has no free range of \(length) bytes")
        return TE_ERR_NO_RESOURCES
    }
    out.pointee = address
    return TE_OK
}

private func cxlFree(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer), object.release(address) else { return TE_ERR_INVALID_ARGUMENT }
    return TE_OK
}

private func staticText(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: staticText("cxl"), version: staticText("0.1.0"), protocols: staticText("cxl"),
        capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
        probe: cxlProbe, create: cxlCreate, destroy: cxlDestroy, local_descriptor: cxlLocalDescriptor,
        register_memory: cxlRegister, unregister_memory: cxlUnregister, open_peer: cxlOpenPeer, close_peer: cxlClosePeer,
        on_handshake: cxlOnHandshake, submit: cxlSubmit, poll: cxlPoll, last_error: cxlLastError,
        allocate_memory: cxlAllocate, free_memory: cxlFree))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
