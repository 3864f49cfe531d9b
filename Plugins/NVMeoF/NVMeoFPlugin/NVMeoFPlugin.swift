import CNVMeoFShim
import CTransportABI
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The nvmeof transport: segments backed by NVMe namespaces (over a fabric, or
// any block device or file). The owner publishes each namespace as a storage
// range of its segment; a peer that sees the same namespace (same host, or
// connected to the same subsystem) reads and writes it directly with direct
// I/O, any other peer goes through the owner over the relay messages.

/// One plugin instance.
final class NVMeoFInstance: @unchecked Sendable {
    /// How a peer's range is reached.
    enum Access {
        case direct(Namespace)
        case relay(segment: String)
    }

    struct PeerRange {
        var address: UInt64
        var length: UInt64
        var access: Access
    }

    struct Peer {
        var name: String
        var ranges: [PeerRange]
    }

    /// One piece of a request for a worker.
    struct Job {
        var request: UInt64
        var write: Bool
        var memory: UInt64
        var length: UInt64
        /// Offset in the namespace (direct) or the owner's address (relay).
        var target: UInt64
        var access: Access
    }

    struct Pending {
        var cookie: UInt64
        var remaining: Int
        var status: Int32
        var bytes: UInt64
    }

    let options: NVMeoFOptions
    let storage: LocalStorage
    let host: UnsafePointer<te_host_services>?
    private let queue = Signal()
    private let finished = Signal()
    private var jobs: [Job] = []
    private var jobHead = 0
    private var pending: [UInt64: Pending] = [:]
    private var nextRequest: UInt64 = 1
    private var done: [te_completion] = []
    private var peers: [UInt64: Peer] = [:]
    private var nextPeer: UInt64 = 1
    /// Namespaces opened to reach peers, by identity (shared by every peer and range on them).
    private var opened: [String: Namespace] = [:]
    /// Controllers connected to reach peers' subsystems.
    private let peerStorage = LocalStorage()
    private var stopping = false
    private var running = 0
    /// Handshake replies that did not fit the host's buffer, kept for its retry.
    private var stash: [String: String] = [:]
    private let errors = Signal()
    private var lastErrors: [pthread_t: UnsafeMutablePointer<CChar>] = [:]

    init(options: NVMeoFOptions, storage: LocalStorage, host: UnsafePointer<te_host_services>?) {
        self.options = options
        self.storage = storage
        self.host = host
    }

    func start() -> Bool {
        for index in 0..<options.workers {
            queue.locked { running += 1 }
            guard startThread({ [self] in work() }) else {
                queue.locked { running -= 1 }
                log(TE_LOG_ERROR, "nvmeof: cannot start I/O thread \(index)")
                return false
            }
        }
        return true
    }

    /// Stops the workers (after the queued jobs), then closes everything.
    func close() {
        queue.locked {
            stopping = true
            queue.broadcast()
            while running > 0 { queue.wait(nanoseconds: 100_000_000) }
        }
        storage.close()
        peerStorage.close()
        opened.removeAll()
    }

    // MARK: Errors and logs

    func setError(_ text: String) {
        let me = pthread_self()
        errors.locked {
            let slot = lastErrors[me] ?? {
                let storage = UnsafeMutablePointer<CChar>.allocate(capacity: 512)
                lastErrors[me] = storage
                return storage
            }()
            let bytes = Array(text.utf8.prefix(511))
            for (i, byte) in bytes.enumerated() { slot[i] = CChar(bitPattern: byte) }
            slot[bytes.count] = 0
        }
    }

    var lastErrorText: UnsafePointer<CChar> {
        let me = pthread_self()
        return errors.locked { lastErrors[me].map { UnsafePointer($0) } } ?? staticText("")
    }

    func log(_ level: Int32, _ text: String) {
        guard let host, let log = host.pointee.log else { return }
        text.withCString { log(host.pointee.host_context, level, $0) }
    }

    // MARK: Descriptor

    var descriptorFragment: String {
        let buffers = storage.ranges.map(\.published)
        return "{\"nvmeof_boot_id\":\"\(bootID)\",\"buffers\":\(RelayCodec.encode(buffers))}"
    }

    // MARK: Peers

    private struct PeerDescriptor: Decodable {
        struct Buffer: Decodable {
            var addr: UInt64
            var length: UInt64
            var `protocol`: String?
            var file_path: String?
            var local_path_map: [String: String]?
            var nvmeof_identity: String?
            var nvmeof_boot_id: String?
            var nvmeof_subsystem: PublishedNamespace.Subsystem?
        }
        var buffers: [Buffer]?
    }

    func openPeer(_ segment: String, _ json: String) -> (Int32, UInt64) {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(json.utf8)) else {
            setError("\(segment): malformed segment descriptor")
            return (TE_ERR_INVALID_ARGUMENT, 0)
        }
        var ranges: [PeerRange] = []
        for buffer in descriptor.buffers ?? [] where buffer.protocol == "nvmeof" {
            let reached = options.direct ? directAccess(buffer) : nil
            if let reached { log(TE_LOG_INFO, "nvmeof: \(segment) range 0x\(String(buffer.addr, radix: 16)) (\(buffer.length) bytes) directly via \(reached.path)") }
            ranges.append(PeerRange(address: buffer.addr, length: buffer.length,
                                    access: reached.map { .direct($0) } ?? .relay(segment: segment)))
        }
        return queue.locked {
            defer { nextPeer += 1 }
            peers[nextPeer] = Peer(name: segment, ranges: ranges)
            return (TE_OK, nextPeer)
        }
    }

    /// Opens the peer's namespace here when this host sees the same one, else nil (relay).
    private func directAccess(_ buffer: PeerDescriptor.Buffer) -> Namespace? {
        guard let identity = buffer.nvmeof_identity else { return nil }
        func open(_ path: String, expect: String?) -> Namespace? {
            var text = [CChar](repeating: 0, count: 64)
            guard nvmeof_identity(path, &text, text.count) == 0 else { return nil }
            let seen = cString(text)
            if let expect, seen != expect { return nil }
            if let namespace = queue.locked({ opened[seen] }) { return namespace.size >= buffer.length ? namespace : nil }
            guard case .success(let namespace) = Namespace.open(path, direct: options.oDirect), namespace.size >= buffer.length else { return nil }
            return queue.locked {
                if let existing = opened[seen] { return existing }
                opened[seen] = namespace
                return namespace
            }
        }
        // Same host and boot: the owner's path (or the one it mapped for us) is the same file if its identity matches.
        if buffer.nvmeof_boot_id == bootID {
            for path in [buffer.local_path_map?[options.hostname], buffer.file_path].compactMap({ $0 }) {
                if let namespace = open(path, expect: identity) { return namespace }
            }
        }
        // Another host: the same subsystem's namespace, connected already or now.
        guard let subsystem = buffer.nvmeof_subsystem else { return nil }
        var entries = SubsystemTable.namespaces(of: subsystem.nqn).filter { $0.nsid == subsystem.nsid }
        if entries.isEmpty && options.connect && nvmeof_fabrics_available() == 0 {
            let target = FabricTarget(trtype: subsystem.trtype, traddr: subsystem.traddr, trsvcid: subsystem.trsvcid,
                                      nqn: subsystem.nqn, nsid: subsystem.nsid, hostTraddr: nil)
            if case .success(let found) = peerStorage.connect(target, log: { log($0, $1) }) { entries = found }
        }
        guard let entry = entries.first(where: { $0.nsid == subsystem.nsid && (subsystem.wwid.isEmpty || $0.wwid == subsystem.wwid) }) else { return nil }
        return open("/dev/\(entry.device)", expect: nil)
    }

    func closePeer(_ handle: UInt64) { queue.locked { _ = peers.removeValue(forKey: handle) } }

    // MARK: Data path

    func submit(_ raw: UnsafeRawPointer?, count: Int, stride: Int, accepted: inout Int) -> Int32 {
        accepted = 0
        for i in 0..<count {
            let request = raw!.loadUnaligned(fromByteOffset: i * stride, as: te_request.self)
            guard request.length > 0, request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE else {
                setError("bad request (opcode \(request.opcode), length \(request.length))")
                return TE_ERR_INVALID_ARGUMENT
            }
            let status: Int32 = queue.locked {
                guard let peer = peers[request.peer] else {
                    setError("unknown peer handle \(request.peer)")
                    return TE_ERR_INVALID_ARGUMENT
                }
                guard let range = peer.ranges.first(where: {
                    request.remote_addr >= $0.address && request.remote_addr - $0.address <= $0.length
                        && request.length <= $0.length - (request.remote_addr - $0.address)
                }) else {
                    setError("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside one of \(peer.name)'s namespaces")
                    return TE_ERR_OUT_OF_RANGE
                }
                let id = nextRequest
                nextRequest += 1
                let piece: UInt64
                switch range.access {
                case .direct: piece = options.ioSize
                case .relay: piece = options.relayChunk
                }
                // `pending` belongs to the `finished` lock (workers complete jobs under it): the
                // entry goes in there, before any of its jobs can be taken (lock order: queue, then finished).
                let pieces = Int((request.length - 1) / piece + 1)
                finished.locked { pending[id] = Pending(cookie: request.cookie, remaining: pieces, status: TE_OK, bytes: 0) }
                var offset: UInt64 = 0
                while offset < request.length {
                    let length = min(piece, request.length - offset)
                    let target: UInt64
                    switch range.access {
                    case .direct: target = request.remote_addr - range.address + offset
                    case .relay: target = request.remote_addr + offset
                    }
                    jobs.append(Job(request: id, write: request.opcode == TE_OP_WRITE, memory: request.local_addr + offset,
                                    length: length, target: target, access: range.access))
                    offset += length
                }
                return TE_OK
            }
            if status != TE_OK { return status }
            accepted = i + 1
        }
        queue.locked { queue.broadcast() }
        return TE_OK
    }

    private func work() {
        while true {
            let next: Job? = queue.locked {
                while jobHead == jobs.count && !stopping { queue.wait(nanoseconds: 1_000_000_000) }
                guard jobHead < jobs.count else { return nil }
                defer {
                    jobHead += 1
                    if jobHead == jobs.count { jobs.removeAll(keepingCapacity: true); jobHead = 0 }
                }
                return jobs[jobHead]
            }
            guard let job = next else { break }
            let status = run(job)
            finish(job, status)
        }
        queue.locked {
            running -= 1
            queue.broadcast()
        }
    }

    private func run(_ job: Job) -> Int32 {
        let memory = UnsafeMutableRawPointer(bitPattern: UInt(job.memory))!
        switch job.access {
        case .direct(let namespace):
            let status = namespace.transfer(write: job.write, memory: memory, length: job.length, offset: job.target)
            if status != 0 {
                setError("\(namespace.path): \(job.write ? "write" : "read") of \(job.length) bytes at \(job.target): \(String(cString: strerror(-status)))")
                return TE_ERR_IO
            }
            return TE_OK
        case .relay(let segment):
            return relay(segment, job, memory)
        }
    }

    /// Sends one chunk through the owner.
    private func relay(_ segment: String, _ job: Job, _ memory: UnsafeMutableRawPointer) -> Int32 {
        guard let host, let send = host.pointee.handshake_send else { return TE_ERR_NOT_SUPPORTED }
        let data = job.write ? Data(bytes: memory, count: Int(job.length)).base64EncodedString() : nil
        let request = RelayCodec.encode(RelayRequest(nvmeof_relay: .init(op: job.write ? "write" : "read", addr: job.target,
                                                                          length: job.length, data: data)))
        var capacity = job.write ? 1024 : RelayCodec.replyCapacity(job.length)
        var bytes: [CChar] = []
        var status = TE_ERR_BUFFER_TOO_SMALL
        // A longer answer than expected (an error text) is fetched again at its size: relayed I/O is idempotent.
        for _ in 0..<2 where status == TE_ERR_BUFFER_TOO_SMALL {
            bytes = [CChar](repeating: 0, count: capacity)
            status = bytes.withUnsafeMutableBufferPointer { pointer -> Int32 in
                var reply = te_buffer(data: pointer.baseAddress, capacity: capacity, length: 0)
                defer { capacity = reply.length + 1 }
                return request.withCString { send(host.pointee.host_context, segment, $0, &reply) }
            }
        }
        guard status == TE_OK else {
            setError("relay through \(segment): \(status)")
            return status
        }
        guard let reply = RelayCodec.decode(RelayReply.self, cString(bytes)) else { return TE_ERR_IO }
        guard reply.status == TE_OK else { return reply.status }
        if !job.write {
            guard let text = reply.data, let payload = Data(base64Encoded: text), payload.count == Int(job.length) else { return TE_ERR_IO }
            payload.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: payload.count) }
        }
        return TE_OK
    }

    private func finish(_ job: Job, _ status: Int32) {
        finished.locked {
            guard var entry = pending[job.request] else { return }
            entry.remaining -= 1
            if status == TE_OK { entry.bytes += job.length } else if entry.status == TE_OK { entry.status = status }
            if entry.remaining > 0 {
                pending[job.request] = entry
                return
            }
            pending[job.request] = nil
            done.append(te_completion(cookie: entry.cookie, status: entry.status, flags: 0, bytes: entry.bytes))
            finished.broadcast()
        }
    }

    func poll(into raw: UnsafeMutableRawPointer?, capacity: Int, stride: Int, timeout: UInt64) -> Int {
        finished.locked {
            if done.isEmpty && timeout > 0 { finished.wait(nanoseconds: timeout) }
            let n = min(capacity, done.count)
            for i in 0..<n { raw!.storeBytes(of: done[i], toByteOffset: i * stride, as: te_completion.self) }
            done.removeFirst(n)
            return n
        }
    }

    // MARK: Owner side of the relay

    func answer(_ request: String) -> String {
        if let kept = finished.locked({ stash.removeValue(forKey: request) }) { return kept }
        guard let body = RelayCodec.decode(RelayRequest.self, request)?.nvmeof_relay else {
            return RelayCodec.encode(RelayReply(status: TE_ERR_INVALID_ARGUMENT, data: nil, error: "not an nvmeof relay request"))
        }
        let write = body.op == "write"
        guard body.op == "read" || write, body.length > 0, body.length <= 512 << 10 else {
            return RelayCodec.encode(RelayReply(status: TE_ERR_INVALID_ARGUMENT, data: nil, error: "bad relay request (\(body.op), \(body.length) bytes)"))
        }
        guard let range = storage.range(containing: body.addr, body.length) else {
            return RelayCodec.encode(RelayReply(status: TE_ERR_OUT_OF_RANGE, data: nil,
                                                error: "[0x\(String(body.addr, radix: 16)), +\(body.length)) is not inside a namespace this segment serves"))
        }
        var buffer = [UInt8](repeating: 0, count: Int(body.length))
        if write {
            guard let text = body.data, let payload = Data(base64Encoded: text), payload.count == buffer.count else {
                return RelayCodec.encode(RelayReply(status: TE_ERR_INVALID_ARGUMENT, data: nil, error: "relay write without \(body.length) bytes of data"))
            }
            buffer = [UInt8](payload)
        }
        let status = buffer.withUnsafeMutableBytes {
            range.namespace.transfer(write: write, memory: $0.baseAddress!, length: body.length, offset: body.addr - range.address)
        }
        guard status == 0 else {
            return RelayCodec.encode(RelayReply(status: TE_ERR_IO, data: nil, error: "\(range.namespace.path): \(String(cString: strerror(-status)))"))
        }
        return RelayCodec.encode(RelayReply(status: TE_OK, data: write ? nil : Data(buffer).base64EncodedString(), error: nil))
    }

    /// Keeps a reply the host's buffer could not hold; its retry with the same request takes it.
    func keep(_ request: String, _ reply: String) {
        finished.locked {
            if stash.count > 64 { stash.removeAll() }
            stash[request] = reply
        }
    }
}

// MARK: - Vtable

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    bytes.withUnsafeBufferPointer { UnsafeMutableRawPointer(data).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> NVMeoFInstance? {
    pointer.map { Unmanaged<NVMeoFInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

func staticText(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

private func nvmeofProbe(_ json: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    let options: NVMeoFOptions
    do { options = try NVMeoFOptions(json: json) } catch {
        _ = write("\(error)", reason)
        _ = write("set MC_NVMEOF_NAMESPACES (or device_name) to paths or tcp|rdma://address:port/<NQN>", hint)
        return TE_ERR_INVALID_ARGUMENT
    }
    switch Probe.run(options) {
    case .ready(let text):
        _ = write(text, reason)
        _ = write("", hint)
        return TE_OK
    case .absent(let why, let fix):
        _ = write(why, reason)
        _ = write(fix, hint)
        return TE_ERR_HARDWARE_ABSENT
    }
}

private func nvmeofCreate(_ json: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out, let options = try? NVMeoFOptions(json: json) else { return TE_ERR_INVALID_ARGUMENT }
    let log = { (level: Int32, text: String) in
        guard let host, let log = host.pointee.log else { return }
        text.withCString { log(host.pointee.host_context, level, $0) }
    }
    let storage: LocalStorage
    switch LocalStorage.open(options, log: log) {
    case .failure(let error):
        log(TE_LOG_ERROR, "nvmeof plugin: \(error)")
        return TE_ERR_HARDWARE_ABSENT
    case .success(let opened): storage = opened
    }
    let object = NVMeoFInstance(options: options, storage: storage, host: host)
    guard object.start() else {
        object.close()
        return TE_ERR_NO_RESOURCES
    }
    if storage.ranges.isEmpty { log(TE_LOG_INFO, "nvmeof plugin: no namespaces of its own; reaches peers' namespaces directly or through their owners") }
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    return TE_OK
}

private func nvmeofDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<NVMeoFInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().close()
    object.release()
}

private func nvmeofLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.descriptorFragment, out)
}

private func nvmeofRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                            _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    // Registered memory is a local source or destination; peers reach it over TCP.
    instance(pointer) == nil ? TE_ERR_INVALID_ARGUMENT : write("{\"protocol\":\"tcp\"}", out)
}

private func nvmeofUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 { TE_OK }

private func nvmeofOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                            _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let segment, let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let (status, handle) = object.openPeer(String(cString: segment), String(cString: descriptor))
    out.pointee = handle
    return status
}

private func nvmeofClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) { instance(pointer)?.closePeer(peer) }

private func nvmeofOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), let request else { return TE_ERR_INVALID_ARGUMENT }
    let text = String(cString: request)
    let answer = object.answer(text)
    let status = write(answer, reply)
    if status == TE_ERR_BUFFER_TOO_SMALL { object.keep(text, answer) }
    return status
}

private func nvmeofSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                          _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    var taken = 0
    let status = object.submit(UnsafeRawPointer(requests), count: count, stride: stride, accepted: &taken)
    accepted.pointee = taken
    return status
}

private func nvmeofPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                        _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    count.pointee = object.poll(into: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride, timeout: timeout)
    return TE_OK
}

private func nvmeofLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? { instance(pointer)?.lastErrorText }

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: staticText("nvmeof"), version: staticText("0.1.0"), protocols: staticText("nvmeof"),
        capabilities: TE_CAP_MEM_HOST | TE_CAP_MEM_STORAGE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
        probe: nvmeofProbe, create: nvmeofCreate, destroy: nvmeofDestroy, local_descriptor: nvmeofLocalDescriptor,
        register_memory: nvmeofRegister, unregister_memory: nvmeofUnregister, open_peer: nvmeofOpenPeer, close_peer: nvmeofClosePeer,
        on_handshake: nvmeofOnHandshake, submit: nvmeofSubmit, poll: nvmeofPoll, last_error: nvmeofLastError,
        allocate_memory: nil, free_memory: nil))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
