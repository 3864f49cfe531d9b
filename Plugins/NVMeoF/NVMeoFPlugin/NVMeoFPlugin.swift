import CNVMeoFShim
import CTransportABI
import TransportPluginKit
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
final class NVMeoFInstance: TransportInstance, @unchecked Sendable {
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

    let options: NVMeoFOptions
    let storage: LocalStorage
    let host: HostServices
    private let queue = Signal()
    private let finished = Signal()
    private let workers = WorkerPool<Job>()
    /// Requests in pieces; belongs to the `finished` lock (workers complete jobs under it).
    private var pending = PartedRequests()
    private var done = CompletionQueue()
    private var peers: [UInt64: Peer] = [:]
    private var nextPeer: UInt64 = 1
    /// Namespaces opened to reach peers, by identity (shared by every peer and range on them).
    private var opened: [String: Namespace] = [:]
    /// Controllers connected to reach peers' subsystems.
    private let peerStorage = LocalStorage()
    /// Pieces relayed through owners (peers whose namespace is not reachable here).
    private let relayCounters = DeviceCounters(name: "relay")

    init(options: NVMeoFOptions, storage: LocalStorage, host: HostServices) {
        self.options = options
        self.storage = storage
        self.host = host
    }

    func start() -> Bool {
        guard workers.start(count: options.workers, name: "te-nvmeof-io", { [self] in { [self] job in finish(job, run(job)) } }) else {
            log(TE_LOG_ERROR, "nvmeof: cannot start its I/O threads")
            return false
        }
        return true
    }

    /// Stops the workers (after the queued jobs), then closes everything.
    func close() {
        workers.stop()
        storage.close()
        peerStorage.close()
        opened.removeAll()
    }

    // MARK: Errors and logs

    func log(_ level: Int32, _ text: String) { host.log(level, text) }

    // MARK: Descriptor

    /// The peers' namespaces this engine opened, then the relay (where it was used).
    func stats() -> String? {
        let namespaces = queue.locked { opened.values.map(\.counters) }.sorted { $0.name < $1.name }
        return DeviceCounters.report(namespaces + [relayCounters])
    }

    func localDescriptor() -> String {
        let buffers = storage.ranges.map(\.published)
        return "{\"nvmeof_boot_id\":\(JSONFragment.string(bootID)),\"buffers\":\(RelayCodec.encode(buffers))}"
    }

    /// Registered memory is a local source or destination; peers reach it over TCP.
    func register(address: UInt64, length: UInt64, location: String) -> String { "{\"protocol\":\"tcp\"}" }

    func unregister(address: UInt64) {}

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

    func openPeer(segment: String, descriptor json: String) throws(PluginFailure) -> UInt64 {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(json.utf8)) else {
            throw .invalid("\(segment): malformed segment descriptor")
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
            return nextPeer
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

    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        // Requests checked before a refused one still run.
        var batch: [Job] = []
        defer { workers.enqueue(contentsOf: batch) }
        for (i, request) in requests.enumerated() {
            guard request.length > 0, request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE else {
                throw .invalid("bad request (opcode \(request.opcode), length \(request.length))")
            }
            try queue.locked { () throws(PluginFailure) in
                guard let peer = peers[request.peer] else { throw .invalid("unknown peer handle \(request.peer)") }
                guard let range = peer.ranges.first(where: {
                    request.remote_addr >= $0.address && request.remote_addr - $0.address <= $0.length
                        && request.length <= $0.length - (request.remote_addr - $0.address)
                }) else {
                    throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside one of \(peer.name)'s namespaces")
                }
                let id = finished.locked { pending.newID() }
                let piece: UInt64
                switch range.access {
                case .direct: piece = options.ioSize
                case .relay: piece = options.relayChunk
                }
                // `pending` belongs to the `finished` lock (workers complete jobs under it); the entry
                // is in before its jobs are queued (after this loop). Lock order: queue, then finished.
                let pieces = Int((request.length - 1) / piece + 1)
                finished.locked { pending.open(id, cookie: request.cookie, parts: pieces) }
                var offset: UInt64 = 0
                while offset < request.length {
                    let length = min(piece, request.length - offset)
                    let target: UInt64
                    switch range.access {
                    case .direct: target = request.remote_addr - range.address + offset
                    case .relay: target = request.remote_addr + offset
                    }
                    batch.append(Job(request: id, write: request.opcode == TE_OP_WRITE, memory: request.local_addr + offset,
                                     length: length, target: target, access: range.access))
                    offset += length
                }
            }
            accepted = i + 1
        }
    }

    /// Runs one piece, counted on its namespace (or the relay) for `stats`.
    private func run(_ job: Job) -> Int32 {
        let counters: DeviceCounters
        switch job.access {
        case .direct(let namespace): counters = namespace.counters
        case .relay: counters = relayCounters
        }
        counters.started(job.length)
        let status = runUncounted(job)
        counters.ended(job.length, isWrite: job.write, succeeded: status == TE_OK)
        return status
    }

    private func runUncounted(_ job: Job) -> Int32 {
        let memory = UnsafeMutableRawPointer(bitPattern: UInt(job.memory))!
        switch job.access {
        case .direct(let namespace):
            let status = namespace.transfer(write: job.write, memory: memory, length: job.length, offset: job.target)
            if status != 0 {
                log(TE_LOG_WARNING, "nvmeof: \(namespace.path): \(job.write ? "write" : "read") of \(job.length) bytes at \(job.target): \(String(cString: strerror(-status)))")
                return TE_ERR_IO
            }
            return TE_OK
        case .relay(let segment):
            return relay(segment, job, memory)
        }
    }

    /// Sends one chunk through the owner.
    private func relay(_ segment: String, _ job: Job, _ memory: UnsafeMutableRawPointer) -> Int32 {
        let data = job.write ? Data(bytes: memory, count: Int(job.length)).base64EncodedString() : nil
        let request = RelayCodec.encode(RelayRequest(nvmeof_relay: .init(op: job.write ? "write" : "read", addr: job.target,
                                                                          length: job.length, data: data)))
        // A longer answer than expected (an error text) is fetched again at its size: relayed I/O is idempotent.
        let answer: String
        do { answer = try host.handshake(peer: segment, request: request, capacity: job.write ? 1024 : RelayCodec.replyCapacity(job.length)) } catch {
            log(TE_LOG_WARNING, "nvmeof: relay through \(segment): \(error.message)")
            return error.status
        }
        guard let reply = RelayCodec.decode(RelayReply.self, answer) else { return TE_ERR_IO }
        guard reply.status == TE_OK else { return reply.status }
        if !job.write {
            guard let text = reply.data, let payload = Data(base64Encoded: text), payload.count == Int(job.length) else { return TE_ERR_IO }
            payload.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: payload.count) }
        }
        return TE_OK
    }

    private func finish(_ job: Job, _ status: Int32) {
        finished.locked {
            guard let completion = pending.partEnded(job.request, status: status, bytes: job.length) else { return }
            done.append(completion)
            finished.broadcast()
        }
    }

    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        finished.locked {
            if done.isEmpty && timeout > 0 { finished.wait(nanoseconds: timeout) }
            return done.drain(into: out)
        }
    }

    // MARK: Owner side of the relay

    func answerHandshake(_ request: String) -> String {
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
}
