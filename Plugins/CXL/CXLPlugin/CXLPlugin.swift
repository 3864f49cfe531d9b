import CCXLShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

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
let bootID: String = BootID.current

/// One plugin instance: the mapped pool, its allocator, peers and finished requests.
final class CXLInstance: TransportInstance, @unchecked Sendable {
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
    private var done = CompletionQueue()
    let host: HostServices
    /// Bytes copied to and from the pool, copies running, and failed copies: the `stats` figures
    /// (one device, named after the pool's file: dax0.0, or the test file's name).
    let counters: DeviceCounters

    init(path: String, base: UInt64, size: UInt64, fd: Int32, poolID: String, flush: Bool, table: PoolTable, host: HostServices) {
        counters = DeviceCounters(name: path.split(separator: "/").last.map(String.init) ?? path)
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

    func log(_ level: Int32, _ text: String) { host.log(level, text) }

    func inPool(_ address: UInt64, _ length: UInt64) -> Bool {
        address >= base && address - base <= size && length <= size - (address - base)
    }

    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        guard let offset = table.allocate(length) else { throw .noResources("the CXL pool (\(size) bytes) has no free range of \(length) bytes") }
        signal.locked { allocations[base + offset] = length }
        return base + offset
    }

    func free(address: UInt64) throws(PluginFailure) {
        guard let length = signal.locked({ allocations.removeValue(forKey: address) }) else {
            throw .invalid("0x\(String(address, radix: 16)) is not a pool allocation of this engine")
        }
        if let range = table.chunkRange(offset: address - base, length: length) {
            let stuck = exposed.forget(range)
            guard stuck == 0 else {
                // A peer may still be writing there: the chunks stay this engine's (out of the
                // pool) until it exits, when the pool takes them back.
                reportStuck(stuck, address)
                log(TE_LOG_WARNING, "cxl plugin: the chunks of 0x\(String(address, radix: 16)) stay out of the pool until this engine exits")
                return
            }
        }
        table.release(address - base, length)
    }

    func stats() -> String? { DeviceCounters.report([counters]) }

    func localDescriptor() -> String {
        "{\"cxl_pool\":\(JSONFragment.string(poolID)),\"cxl_base\":\(base),\"cxl_size\":\(size),\"cxl_owner\":\(table.owner)}"
    }

    /// Exposes a registered range of this engine's pool memory to peers (its pool offset in the
    /// fragment). Memory outside the pool, or pool memory this engine does not own, can be a local
    /// source or destination, but peers cannot reach it.
    func register(address: UInt64, length: UInt64, location: String) -> String {
        guard inPool(address, length), let range = table.chunkRange(offset: address - base, length: length), table.owns(range) else { return "{}" }
        exposed.register(address: address, range: range)
        return "{\"cxl_offset\":\(address - base)}"
    }

    /// Only a register that exposed a range (its fragment names the offset) has anything to undo.
    func registrationNotDelivered(address: UInt64, fragment: String) {
        if fragment.contains("cxl_offset") { unregister(address: address) }
    }

    /// Conceals an unregistered range from peers once no registration covers it.
    func unregister(address: UInt64) { reportStuck(exposed.unregister(address: address), address) }

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

    func openPeer(segment: String, descriptor json: String) throws(PluginFailure) -> UInt64 {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(json.utf8)) else {
            throw .invalid("\(segment): malformed segment descriptor")
        }
        guard descriptor.cxl_pool == poolID, let peerBase = descriptor.cxl_base else {
            throw .unreachable("\(segment) uses CXL pool \(descriptor.cxl_pool ?? "none"), this engine \(poolID)")
        }
        guard let owner = descriptor.cxl_owner, owner >> 63 == 1 else {
            throw .unreachable("\(segment) publishes no cxl_owner (an engine of an earlier pool table layout)")
        }
        // Only buffers inside the peer's pool mapping are reachable through the pool.
        let buffers = (descriptor.buffers ?? []).filter { $0.cxl_offset != nil }.map { (address: $0.addr, length: $0.length) }
        return signal.locked {
            defer { nextPeer += 1 }
            peers[nextPeer] = Peer(name: segment, base: peerBase, owner: owner, buffers: buffers)
            return nextPeer
        }
    }

    func closePeer(_ handle: UInt64) { signal.locked { _ = peers.removeValue(forKey: handle) } }

    /// Copies each request at once (memory to memory; nothing to wait for).
    /// Copies are pinned and made in slices of at most this many bytes.
    static let sliceBytes: UInt64 = 8 << 20

    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        // Pollers learn of what was copied, also when a later request is refused.
        defer { signal.locked { signal.broadcast() } }
        for (i, request) in requests.enumerated() {
            guard let peer = signal.locked({ peers[request.peer] }) else { throw .invalid("unknown peer handle \(request.peer)") }
            guard request.length > 0, request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE else {
                throw .invalid("bad request (opcode \(request.opcode), length \(request.length))")
            }
            guard peer.buffers.contains(where: { request.remote_addr >= $0.address && request.remote_addr - $0.address <= $0.length
                                                    && request.length <= $0.length - (request.remote_addr - $0.address) }),
                  request.remote_addr >= peer.base, request.remote_addr - peer.base <= size,
                  request.length <= size - (request.remote_addr - peer.base) else {
                throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside one of \(peer.name)'s pool buffers")
            }
            // The pool's table never, and a chunk only while its owner exposes it (peers with a
            // descriptor from before an unregister are refused here). Copies go in slices, each
            // pinned on its own, so an unregister waits for one slice at most, never a whole
            // large request (its grace period is bounded).
            let offset = request.remote_addr - peer.base
            var copied: UInt64 = 0
            counters.started(request.length)
            while copied < request.length {
                let length = min(Self.sliceBytes, request.length - copied)
                guard let chunks = table.chunkRange(offset: offset + copied, length: length), table.pin(chunks, holder: peer.owner) else {
                    // Unexposed mid-request (an unregister): the request ends with what was copied.
                    if copied > 0 { break }
                    counters.ended(request.length, isWrite: request.opcode == TE_OP_WRITE, succeeded: false)
                    throw .outOfRange("remote range [0x\(String(request.remote_addr + copied, radix: 16)), +\(length)) of \(peer.name) is not exposed in the pool (unregistered, or the pool's table)")
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
            counters.ended(request.length, isWrite: request.opcode == TE_OP_WRITE, succeeded: status == TE_OK)
            signal.locked { done.complete(request.cookie, status: status, bytes: copied) }
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

