import CRDMAShim
import CTransportABI
import RDMATopology
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One plugin instance: the opened devices, registrations, peers, requests in
/// flight, and a repair thread that rebuilds failed endpoints and retries their slices.
final class RDMAInstance: @unchecked Sendable {
    struct Registration {
        var address: UInt64
        var length: UInt64
        /// NUMA location ("cpu:N") used to pick local devices.
        var location: String
        var regions: [UnsafeMutableRawPointer?]
        var lkeys: [UInt32]
        var rkeys: [UInt32]
        /// Local devices to spread its slices over (the priority matrix row of `location`).
        var candidates: [Int] = []
    }
    struct RemoteBuffer {
        var address: UInt64
        var length: UInt64
        var location: String
        var rkeys: [UInt32]
    }
    struct PeerDevice {
        var name: String
        var lid: UInt16
        var gid: [UInt8]
    }
    /// An opened peer: its buffers and devices, and the connection each local device uses to reach it.
    /// A class: submit looks one up per request, and a reference costs one retain, a struct copy four.
    final class Peer {
        let name: String
        let buffers: [RemoteBuffer]
        let devices: [PeerDevice]
        let connections: [Connection]
        init(name: String, buffers: [RemoteBuffer], devices: [PeerDevice], connections: [Connection]) {
            self.name = name
            self.buffers = buffers
            self.devices = devices
            self.connections = connections
        }
    }
    struct Parent {
        var cookie: UInt64
        var remaining: Int
        var status: Int32
        var bytes: UInt64
    }

    let options: RDMAOptions
    let host: UnsafePointer<te_host_services>?
    private(set) var devices: [RDMADevice] = []
    /// Guards the state below. The mutex makes each access exclusive, so the properties opt out
    /// of Swift's runtime exclusivity checks (a thread-local lookup per access, a tenth of a
    /// small transfer's CPU time in profiles).
    let signal = Signal()
    @exclusivity(unchecked) private var peers: [UInt64: Peer] = [:]
    @exclusivity(unchecked) private var nextPeer: UInt64 = 1
    @exclusivity(unchecked) private var registrations: [Registration] = []
    @exclusivity(unchecked) private var parents: [UInt64: Parent] = [:]
    @exclusivity(unchecked) private var nextParent: UInt64 = 1
    @exclusivity(unchecked) private var done: [te_completion] = []
    @exclusivity(unchecked) private var nextDevice = 0
    /// location -> preferred local device indices (upstream's priority matrix, by NUMA node).
    private var preferred: [String: [Int]] = [:]
    @exclusivity(unchecked) private var repairQueue: [Part] = []
    @exclusivity(unchecked) private var stopping = false
    @exclusivity(unchecked) private var repairRunning = false
    private let lastError: UnsafeMutablePointer<CChar> = {
        let storage = UnsafeMutablePointer<CChar>.allocate(capacity: 512)
        storage.initialize(repeating: 0, count: 512)
        return storage
    }()

    init(options: RDMAOptions, host: UnsafePointer<te_host_services>?) {
        self.options = options
        self.host = host
    }

    // MARK: Life cycle

    func open(_ found: [DiscoveredDevice]) -> String? {
        for (index, device) in found.enumerated() {
            var handle: OpaquePointer?
            let depth = Int32(min(max(options.maxWorkRequests * options.queuePairsPerEndpoint * 16, 1024), 65536))
            let status = rdma_open(device.name, device.info.port, depth, &handle)
            guard status == 0, let handle else {
                close()
                return "\(device.name): cannot open (\(String(cString: strerror(-status))))"
            }
            let opened = RDMADevice(index: index, handle: handle, discovered: device, options: options, capacity: 4096) { [unowned self] in
                finished($0)
            }
            devices.append(opened)
            guard opened.start() else { close(); return "cannot start the completion thread of \(device.name)" }
        }
        preferred = Self.priorityMatrix(devices)
        signal.locked { repairRunning = true }
        guard startThread(name: "te-rdma-repair", { [self] in repairLoop() }) else { close(); return "cannot start the repair thread" }
        return nil
    }

    func close() {
        signal.locked {
            stopping = true
            signal.broadcast()
            signal.wakeRepair()
            while repairRunning { signal.wait(nanoseconds: 10_000_000) }
        }
        let regions = signal.locked { () -> [Registration] in defer { registrations.removeAll() }; return registrations }
        for registration in regions { for region in registration.regions { _ = rdma_dereg_mr(region) } }
        for device in devices { device.close() }
        devices.removeAll()
    }

    /// "cpu:N" for every NUMA node: the devices on that node first (all devices when none is);
    /// "cuda:N" for every CUDA device: the devices nearest to it on the PCI tree.
    static func priorityMatrix(_ devices: [RDMADevice]) -> [String: [Int]] {
        var nodes: [Int] = []
        if let directory = opendir("/sys/devices/system/node") {
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name.hasPrefix("node"), let node = Int(name.dropFirst(4)) { nodes.append(node) }
            }
            closedir(directory)
        }
        if nodes.isEmpty { nodes = [0] }
        var matrix: [String: [Int]] = ["*": Array(devices.indices)]
        for node in nodes.sorted() {
            let local = devices.filter { $0.discovered.numaNode == node }.map(\.index)
            matrix["cpu:\(node)"] = local.isEmpty ? Array(devices.indices) : local
        }
        let positions = devices.map { PCITopology.hca($0.name) }
        matrix.merge(PCITopology.gpuRows(gpuBusIDs: PCITopology.cudaBusIDs(), hcas: positions)) { _, gpu in gpu }
        return matrix
    }

    // MARK: Errors and logging

    func setError(_ text: String) { signal.locked { setErrorLocked(text) } }

    private func setErrorLocked(_ text: String) {
        let bytes = Array(text.utf8.prefix(511))
        for (i, byte) in bytes.enumerated() { lastError[i] = CChar(bitPattern: byte) }
        lastError[bytes.count] = 0
    }

    var lastErrorText: UnsafePointer<CChar> { UnsafePointer(lastError) }

    func log(_ level: Int32, _ text: String) {
        guard let host, let log = host.pointee.log else { return }
        text.withCString { log(host.pointee.host_context, level, $0) }
    }

    // MARK: Descriptor

    func nicPath(_ device: RDMADevice) -> String { "\(options.segmentName)@\(device.name)" }

    /// `devices` and `priority_matrix` as upstream publishes them.
    func descriptorFragment() -> String {
        let list = devices.map { device in
            "{\"name\":\(JSONText.string(device.name)),\"lid\":\(device.discovered.info.lid),\"gid\":\(JSONText.string(JSONText.gid(device.gidBytes)))}"
        }.joined(separator: ",")
        let matrix = preferred.keys.sorted().map { location -> String in
            let chosen = preferred[location] ?? []
            let first = chosen.map { JSONText.string(devices[$0].name) }.joined(separator: ",")
            let rest = devices.indices.filter { !chosen.contains($0) }.map { JSONText.string(devices[$0].name) }.joined(separator: ",")
            return "\(JSONText.string(location)):[[\(first)],[\(rest)]]"
        }.joined(separator: ",")
        return "{\"devices\":[\(list)],\"priority_matrix\":{\(matrix)}}"
    }

    // MARK: Memory

    /// Managed buffers this plugin allocated: address -> CUDA ordinal (nil: host memory).
    private var allocations: [UInt64: Int?] = [:]

    /// A managed buffer: device memory for `cuda:N` (registered through GPUDirect RDMA),
    /// page-aligned host memory for any other location.
    func allocate(length: UInt64, location: String) -> (Int32, UInt64) {
        var pointer: UnsafeMutableRawPointer?
        var ordinal: Int? = nil
        if location.hasPrefix("cuda:") {
            guard let index = Int(location.dropFirst(5)), index >= 0 else {
                setError("\(location): not a CUDA device location (cuda:N)")
                return (TE_ERR_INVALID_ARGUMENT, 0)
            }
            let status = rdma_cuda_alloc(Int32(index), Int(length), &pointer)
            guard status == 0, pointer != nil else {
                switch status {
                case -ENOSYS: setError("\(location) memory needs the CUDA driver (libcuda.so.1): not installed, or it found no usable GPU")
                case -ENODEV: setError("no CUDA device \(index)")
                default: setError("cuMemAlloc of \(length) bytes on \(location) failed")
                }
                return (status == -ENOMEM ? TE_ERR_NO_RESOURCES : TE_ERR_HARDWARE_ABSENT, 0)
            }
            ordinal = index
        } else {
            guard posix_memalign(&pointer, 4096, Int(length)) == 0, pointer != nil else {
                setError("posix_memalign of \(length) bytes failed")
                return (TE_ERR_NO_RESOURCES, 0)
            }
        }
        let address = UInt64(UInt(bitPattern: pointer))
        signal.locked { allocations[address] = ordinal }
        return (TE_OK, address)
    }

    /// Frees a managed buffer (the host unregistered it first).
    func free(address: UInt64) -> Int32 {
        guard let ordinal = signal.locked({ allocations.removeValue(forKey: address) }) else {
            setError("0x\(String(address, radix: 16)) was not allocated by this plugin")
            return TE_ERR_INVALID_ARGUMENT
        }
        let pointer = UnsafeMutableRawPointer(bitPattern: UInt(address))
        if let ordinal { return rdma_cuda_free(Int32(ordinal), pointer) == 0 ? TE_OK : TE_ERR_INTERNAL }
        Glibc.free(pointer)
        return TE_OK
    }

    func register(address: UInt64, length: UInt64, location requested: String) -> (Int32, String) {
        var location = requested
        if location.isEmpty || location == "*" {
            let node = rdma_numa_node_of(UnsafeRawPointer(bitPattern: UInt(address)))
            location = "cpu:\(max(node, 0))"
        }
        var registration = Registration(address: address, length: length, location: location, regions: [], lkeys: [], rkeys: [])
        let gpu = location.hasPrefix("cuda:")
        for device in devices {
            var region: UnsafeMutableRawPointer?
            var lkey: UInt32 = 0, rkey: UInt32 = 0
            let pointer = UnsafeMutableRawPointer(bitPattern: UInt(address))
            var status = rdma_reg_mr(device.handle, pointer, Int(length), &region, &lkey, &rkey)
            var dmabuf: Int32 = 0
            if status != 0 && gpu {
                // GPU memory: ibv_reg_mr works where nvidia-peermem is loaded; else a dma-buf from the CUDA driver.
                dmabuf = rdma_reg_dmabuf_mr(device.handle, pointer, Int(length), &region, &lkey, &rkey)
                if dmabuf == 0 { status = 0 }
            }
            guard status == 0 else {
                for region in registration.regions { _ = rdma_dereg_mr(region) }
                var text = "ibv_reg_mr of \(length) bytes at 0x\(String(address, radix: 16)) (\(location)) on \(device.name): \(String(cString: strerror(-status)))"
                if gpu {
                    text += dmabuf == -ENOSYS
                        ? "; GPU memory needs the nvidia-peermem module, or the CUDA driver (>= 11.7) for a dma-buf registration, which it does not offer here"
                        : "; the dma-buf registration failed too: \(String(cString: strerror(-dmabuf))) (GPUDirect RDMA needs nvidia-peermem or dma-buf support in the NIC driver)"
                } else if status == -ENOMEM || status == -EPERM {
                    text += " (check the memlock limit: ulimit -l)"
                }
                setError(text)
                return (TE_ERR_NO_RESOURCES, "")
            }
            registration.regions.append(region)
            registration.lkeys.append(lkey)
            registration.rkeys.append(rkey)
        }
        signal.locked {
            registration.candidates = preferred[location] ?? preferred["*"] ?? Array(devices.indices)
            registrations.removeAll { $0.address == address }
            let index = registrations.firstIndex { $0.address > address } ?? registrations.count
            registrations.insert(registration, at: index)
        }
        return (TE_OK, "{\"rkey\":[\(registration.rkeys.map(String.init).joined(separator: ","))],\"lkey\":[\(registration.lkeys.map(String.init).joined(separator: ","))]}")
    }

    func unregister(address: UInt64) -> Int32 {
        let removed = signal.locked { () -> Registration? in
            guard let index = registrations.firstIndex(where: { $0.address == address }) else { return nil }
            return registrations.remove(at: index)
        }
        guard let removed else {
            setError("no registration starts at 0x\(String(address, radix: 16))")
            return TE_ERR_INVALID_ARGUMENT
        }
        for region in removed.regions { _ = rdma_dereg_mr(region) }
        return TE_OK
    }

    // MARK: Handshake

    /// Upstream's HandShakeDesc, the fields this transport uses.
    struct Handshake: Decodable {
        var local_nic_path: String?
        var peer_nic_path: String?
        var local_lid: UInt16?
        var local_gid: String?
        var qp_num: [UInt32]?
        var reply_msg: String?
    }

    private func handshakeJSON(local: String, peer: String, device: RDMADevice?, queuePairs: [UInt32], reply: String) -> String {
        let lid = device?.discovered.info.lid ?? 0
        let gid = device.map { JSONText.gid($0.gidBytes) } ?? ""
        return "{\"local_nic_path\":\(JSONText.string(local)),\"peer_nic_path\":\(JSONText.string(peer)),\"local_lid\":\(lid),"
            + "\"local_gid\":\(JSONText.string(gid)),\"qp_num\":[\(queuePairs.map(String.init).joined(separator: ","))],"
            + "\"reply_msg\":\(JSONText.string(reply))}"
    }

    /// Sends a Connection handshake through the host and returns the peer's answer.
    private func sendHandshake(to segment: String, _ request: String) -> Result<Handshake, FailureText> {
        guard let host, let send = host.pointee.handshake_send else { return .failure(FailureText("the host offers no handshake channel")) }
        var capacity = 4096
        for _ in 0..<2 {
            let storage = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
            defer { storage.deallocate() }
            var reply = te_buffer(data: storage, capacity: capacity, length: 0)
            let status = segment.withCString { name in request.withCString { send(host.pointee.host_context, name, $0, &reply) } }
            if status == TE_ERR_BUFFER_TOO_SMALL { capacity = reply.length + 1; continue }
            guard status == TE_OK else { return .failure(FailureText("handshake with \(segment) failed (status \(status))")) }
            guard let answer = try? JSONDecoder().decode(Handshake.self, from: Data(String(cString: storage).utf8)) else {
                return .failure(FailureText("\(segment) answered the handshake with malformed JSON"))
            }
            return .success(answer)
        }
        return .failure(FailureText("handshake reply from \(segment) too large"))
    }

    /// Builds and connects a fresh endpoint from `device` to `peerPath` (active side).
    private func establish(_ device: RDMADevice, peerSegment: String, peerPath: String) -> Result<Endpoint, FailureText> {
        let endpoint: Endpoint
        switch device.makeEndpoint() {
        case .success(let made): endpoint = made
        case .failure(let error): return .failure(FailureText("ibv_create_qp on \(device.name): \(error.text)"))
        }
        let request = handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: endpoint.queuePairNumbers, reply: "")
        let answer: Handshake
        switch sendHandshake(to: peerSegment, request) {
        case .success(let reply): answer = reply
        case .failure(let failure): endpoint.destroy(); return .failure(failure)
        }
        if let message = answer.reply_msg, !message.isEmpty {
            endpoint.destroy()
            if message == Self.simultaneousOpen { return .failure(FailureText(message, simultaneousOpen: true)) }
            return .failure(FailureText("\(peerSegment) rejected the handshake: \(message)"))
        }
        guard answer.local_nic_path == peerPath, answer.peer_nic_path == nicPath(device) else {
            endpoint.destroy()
            return .failure(FailureText("\(peerSegment) answered for \(answer.local_nic_path ?? "?") -> \(answer.peer_nic_path ?? "?"), expected \(peerPath) -> \(nicPath(device))"))
        }
        guard let queuePairs = answer.qp_num, queuePairs.count == endpoint.queuePairs.count else {
            endpoint.destroy()
            return .failure(FailureText("QP count mismatch: \(answer.qp_num?.count ?? 0) from \(peerSegment), \(endpoint.queuePairs.count) here"))
        }
        guard let gid = answer.local_gid.flatMap(JSONText.parseGID) else { endpoint.destroy(); return .failure(FailureText("\(peerSegment) sent no valid local_gid")) }
        let status = device.connect(endpoint, peerQueuePairs: queuePairs, peerLID: answer.local_lid ?? 0, peerGID: gid)
        guard status == 0 else { endpoint.destroy(); return .failure(FailureText("ibv_modify_qp to RTS on \(device.name): \(String(cString: strerror(-status)))")) }
        return .success(endpoint)
    }

    /// Passive side: a peer asks one of our devices to connect to its QPs.
    func answerHandshake(_ json: String) -> String {
        guard let request = try? JSONDecoder().decode(Handshake.self, from: Data(json.utf8)) else {
            return handshakeJSON(local: "", peer: "", device: nil, queuePairs: [], reply: "malformed handshake")
        }
        let peerPath = request.local_nic_path ?? ""
        let wanted = request.peer_nic_path ?? ""
        let deviceName = wanted.split(separator: "@").last.map(String.init) ?? ""
        guard let device = devices.first(where: { $0.name == deviceName }) else {
            return handshakeJSON(local: wanted, peer: peerPath, device: nil, queuePairs: [], reply: "no device '\(deviceName)' here")
        }
        guard let queuePairs = request.qp_num, !queuePairs.isEmpty, let gid = request.local_gid.flatMap(JSONText.parseGID),
              peerPath.contains("@") else {
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "incomplete handshake (qp_num, local_gid, local_nic_path)")
        }
        // Both sides opening each other at once: the lower NIC path's own handshake wins, this one
        // is refused, and its sender uses the endpoint the winner's handshake builds there.
        if nicPath(device) < peerPath && device.lock.locked({ device.connecting.contains(peerPath) }) {
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: Self.simultaneousOpen)
        }
        let endpoint: Endpoint
        switch device.makeEndpoint() {
        case .success(let made): endpoint = made
        case .failure(let error):
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "ibv_create_qp: \(error.text)")
        }
        guard queuePairs.count == endpoint.queuePairs.count else {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "QP count mismatch (\(queuePairs.count) vs \(endpoint.queuePairs.count); set MC_NUM_QP_PER_EP alike)")
        }
        let status = device.connect(endpoint, peerQueuePairs: queuePairs, peerLID: request.local_lid ?? 0, peerGID: gid)
        guard status == 0 else {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "ibv_modify_qp: \(String(cString: strerror(-status)))")
        }
        let peerSegment = String(peerPath[..<peerPath.lastIndex(of: "@")!])
        if case .failure(let refusal) = device.register(Connection(peerNicPath: peerPath, peerSegment: peerSegment, peerDevice: 0, endpoint: endpoint)) {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: refusal.text)
        }
        return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: endpoint.queuePairNumbers, reply: "")
    }

    // MARK: Peers

    private struct PeerDescriptor: Decodable {
        struct Device: Decodable {
            var name: String
            var lid: UInt16?
            var gid: String?
        }
        struct Buffer: Decodable {
            var name: String?
            var addr: UInt64
            var length: UInt64
            var rkey: [UInt32]?
        }
        var devices: [Device]?
        var buffers: [Buffer]?
    }

    /// Opens a peer: one connection per local device, to the peer device with the same name if there
    /// is one, else to the peer's device at the same position.
    func openPeer(segment: String, descriptorJSON: String) -> (Int32, UInt64) {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(descriptorJSON.utf8)) else {
            setError("\(segment): malformed segment descriptor")
            return (TE_ERR_INVALID_ARGUMENT, 0)
        }
        let peerDevices = (descriptor.devices ?? []).map { PeerDevice(name: $0.name, lid: $0.lid ?? 0, gid: $0.gid.flatMap(JSONText.parseGID) ?? []) }
        guard !peerDevices.isEmpty else {
            setError("\(segment) publishes no RDMA devices")
            return (TE_ERR_PEER_UNREACHABLE, 0)
        }
        var buffers: [RemoteBuffer] = []
        for buffer in descriptor.buffers ?? [] {
            guard let keys = buffer.rkey, keys.count == peerDevices.count else {
                setError("\(segment): buffer at 0x\(String(buffer.addr, radix: 16)) has \(buffer.rkey?.count ?? 0) rkeys for \(peerDevices.count) devices")
                return (TE_ERR_INVALID_ARGUMENT, 0)
            }
            buffers.append(RemoteBuffer(address: buffer.addr, length: buffer.length, location: buffer.name ?? "*", rkeys: keys))
        }
        var connections: [Connection] = []
        for device in devices {
            let target = peerDevices.firstIndex { $0.name == device.name } ?? device.index % peerDevices.count
            let peerPath = "\(segment)@\(peerDevices[target].name)"
            let opened = device.establishing(peerPath, waitNanoseconds: Self.establishWaitNanoseconds, reuse: { existing in
                !existing.current.broken && existing.peerDevice == target && !existing.stale.load(ordering: .acquiring)
            }) {
                let before = device.lock.locked { device.connections[peerPath]?.current }
                switch establish(device, peerSegment: segment, peerPath: peerPath) {
                case .success(let endpoint):
                    let registered = device.register(Connection(peerNicPath: peerPath, peerSegment: segment, peerDevice: target, endpoint: endpoint))
                    switch registered {
                    case .success(let connection): connection.stale.store(false, ordering: .releasing)
                    case .failure: endpoint.destroy()
                    }
                    return registered
                case .failure(let failure) where failure.simultaneousOpen:
                    return device.awaitPassive(peerPath, replacing: before, peerDevice: target, nanoseconds: Self.establishWaitNanoseconds)
                case .failure(let failure):
                    return .failure(failure)
                }
            }
            switch opened {
            case .success(let connection):
                connection.users.add(1, ordering: .relaxed)
                connections.append(connection)
            case .failure(let failure):
                setError(failure.text)
                return (TE_ERR_PEER_UNREACHABLE, 0)
            }
        }
        let peer = Peer(name: segment, buffers: buffers, devices: peerDevices, connections: connections)
        let handle = signal.locked { () -> UInt64 in
            defer { nextPeer += 1 }
            peers[nextPeer] = peer
            return nextPeer
        }
        return (TE_OK, handle)
    }

    /// How long an open_peer or a repair waits for another one establishing the same path.
    static let establishWaitNanoseconds: UInt64 = 30_000_000_000
    /// The reply_msg refusing a handshake because this side's own, to the same path, goes first.
    static let simultaneousOpen = "simultaneous open: this side's handshake to you goes first; use the endpoint it builds"


    /// Forgets a peer; a connection no open peer uses any more is reconnected by the next open_peer.
    func closePeer(_ handle: UInt64) {
        guard let peer = signal.locked({ peers.removeValue(forKey: handle) }) else { return }
        for connection in peer.connections where connection.users.subtract(1, ordering: .relaxed).newValue <= 0 {
            connection.stale.store(true, ordering: .releasing)
        }
    }

    // MARK: Data path

    private func contains(_ base: UInt64, _ length: UInt64, _ address: UInt64, _ size: UInt64) -> Bool {
        address >= base && address - base <= length && size <= length - (address - base)
    }

    /// The next slice of a request with `remaining` bytes left: `MC_SLICE_SIZE`, with a short
    /// tail merged into it, as upstream does (fragment limit slice/4).
    private func sliceLength(remaining: UInt64) -> UInt64 {
        let slice = options.sliceSize
        return remaining > slice && remaining - slice <= slice / 4 ? remaining : min(slice, remaining)
    }

    /// Validates, slices and queues requests; never blocks.
    func submit(_ raw: UnsafeRawPointer?, count: Int, stride: Int, accepted: inout Int) -> Int32 {
        accepted = 0
        guard !devices.isEmpty else { return TE_ERR_INTERNAL }
        // The first slice waits in `lone` and the rest go to per-device lists, made only once a
        // second slice exists: a synchronous transfer's one slice allocates no arrays.
        var lone: (device: Int, part: Part)? = nil
        var perDevice: [[Part]] = []
        let status = signal.locked { () -> Int32 in
            for i in 0..<count {
                let request = raw!.loadUnaligned(fromByteOffset: i * stride, as: te_request.self)
                guard let peer = peers[request.peer] else { setErrorLocked("unknown peer handle \(request.peer)"); return TE_ERR_INVALID_ARGUMENT }
                guard request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE, request.length > 0 else {
                    setErrorLocked("bad request (opcode \(request.opcode), length \(request.length))")
                    return TE_ERR_INVALID_ARGUMENT
                }
                // Only inside one buffer the peer published, and only from registered local memory.
                guard let remote = peer.buffers.first(where: { contains($0.address, $0.length, request.remote_addr, request.length) }) else {
                    setErrorLocked("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is outside \(peer.name)'s buffers")
                    return TE_ERR_OUT_OF_RANGE
                }
                guard let local = registrations.last(where: { contains($0.address, $0.length, request.local_addr, request.length) }) else {
                    setErrorLocked("local range [0x\(String(request.local_addr, radix: 16)), +\(request.length)) is not registered memory")
                    return TE_ERR_OUT_OF_RANGE
                }
                let candidates = local.candidates
                // A request of one slice (most small ones) needs no parent record: its slice
                // carries the cookie (parent 0) and completes it.
                let single = sliceLength(remaining: request.length) == request.length
                let parentID = single ? 0 : nextParent
                if !single { nextParent += 1 }
                var offset: UInt64 = 0
                var pieces = 0
                while offset < request.length {
                    let length = sliceLength(remaining: request.length - offset)
                    let device = candidates[nextDevice % candidates.count]
                    nextDevice &+= 1
                    let connection = peer.connections[device]
                    let part = Part(
                        isWrite: request.opcode == TE_OP_WRITE, local: request.local_addr + offset, length: UInt32(length),
                        lkey: local.lkeys[device], remote: request.remote_addr + offset, rkey: remote.rkeys[connection.peerDevice],
                        parent: parentID, cookie: request.cookie, connection: connection, retries: 0)
                    if lone == nil && perDevice.isEmpty {
                        lone = (device, part)
                    } else {
                        if let first = lone {
                            perDevice = Array(repeating: [], count: devices.count)
                            perDevice[first.device].append(first.part)
                            lone = nil
                        }
                        perDevice[device].append(part)
                    }
                    offset += length
                    pieces += 1
                }
                if !single { parents[parentID] = Parent(cookie: request.cookie, remaining: pieces, status: TE_OK, bytes: 0) }
                accepted = i + 1
            }
            return TE_OK
        }
        if let lone { devices[lone.device].enqueue(lone.part) }
        for (index, parts) in perDevice.enumerated() where !parts.isEmpty { devices[index].enqueue(parts) }
        return status
    }

    /// Slices finished (or failed) on a device.
    private func finished(_ parts: [FinishedPart]) {
        signal.locked {
            for part in parts {
                if var retry = part.retry, retry.retries < options.retryCount, !stopping {
                    retry.retries += 1
                    repairQueue.append(retry)
                    signal.wakeRepair()
                    if let error = part.error { setErrorLocked(error) }
                    continue
                }
                if part.parent == 0 {
                    if part.status != TE_OK, let error = part.error { setErrorLocked(error) }
                    done.append(te_completion(cookie: part.cookie, status: part.status, flags: 0, bytes: part.status == TE_OK ? part.bytes : 0))
                    continue
                }
                guard var parent = parents[part.parent] else { continue }
                parent.remaining -= 1
                if part.status == TE_OK { parent.bytes += part.bytes } else {
                    parent.status = part.status
                    if let error = part.error { setErrorLocked(error) }
                }
                if parent.remaining == 0 {
                    parents.removeValue(forKey: part.parent)
                    done.append(te_completion(cookie: parent.cookie, status: parent.status, flags: 0, bytes: parent.status == TE_OK ? parent.bytes : 0))
                } else {
                    parents[part.parent] = parent
                }
            }
            signal.broadcast()
        }
    }

    /// Rebuilds broken endpoints (a new handshake, new QPs) and posts their failed slices again;
    /// a slice whose peer cannot be reached any more fails.
    private func repairLoop() {
        while true {
            let batch = signal.locked { () -> [Part]? in
                while repairQueue.isEmpty && !stopping { signal.waitForRepair(nanoseconds: 100_000_000) }
                if stopping { return nil }
                defer { repairQueue.removeAll() }
                return repairQueue
            }
            guard let batch else { break }
            var failed: [FinishedPart] = []
            var repaired: [ObjectIdentifier: Bool] = [:]
            var perDevice = [[Part]](repeating: [], count: devices.count)
            for part in batch {
                let connection = part.connection
                let key = ObjectIdentifier(connection)
                guard let device = devices.first(where: { candidate in candidate.lock.locked { candidate.connections[connection.peerNicPath] === connection } }) else {
                    failed.append(FinishedPart(parent: part.parent, cookie: part.cookie, status: TE_ERR_PEER_UNREACHABLE, bytes: 0, error: "connection to \(connection.peerNicPath) is gone"))
                    continue
                }
                if repaired[key] == nil {
                    // Through the gate: an open_peer may be establishing this path right now.
                    let rebuilt = device.establishing(connection.peerNicPath, waitNanoseconds: Self.establishWaitNanoseconds,
                                                      reuse: { !$0.current.broken }) {
                        let before = device.lock.locked { connection.current }
                        switch establish(device, peerSegment: connection.peerSegment, peerPath: connection.peerNicPath) {
                        case .success(let endpoint):
                            device.install(endpoint, on: connection)
                            log(TE_LOG_WARNING, "rdma: rebuilt the endpoint \(device.name) -> \(connection.peerNicPath) after a QP error")
                            return .success(connection)
                        case .failure(let failure) where failure.simultaneousOpen:
                            // The peer repairs this path too, and its handshake goes first.
                            return device.awaitPassive(connection.peerNicPath, replacing: before, peerDevice: connection.peerDevice,
                                                       nanoseconds: Self.establishWaitNanoseconds)
                        case .failure(let failure):
                            return .failure(failure)
                        }
                    }
                    switch rebuilt {
                    case .success:
                        repaired[key] = true
                    case .failure(let failure):
                        log(TE_LOG_WARNING, "rdma: cannot rebuild \(device.name) -> \(connection.peerNicPath): \(failure.text)")
                        setError(failure.text)
                        repaired[key] = false
                    }
                }
                if repaired[key] == true {
                    perDevice[device.index].append(part)
                } else {
                    failed.append(FinishedPart(parent: part.parent, cookie: part.cookie, status: TE_ERR_PEER_UNREACHABLE, bytes: 0,
                                               error: "\(connection.peerNicPath) unreachable after a QP error"))
                }
            }
            for (index, parts) in perDevice.enumerated() where !parts.isEmpty { devices[index].enqueue(parts) }
            if !failed.isEmpty { finished(failed) }
        }
        signal.locked { repairRunning = false; signal.broadcast() }
    }

    /// Hands out finished requests, waiting at most `timeout` for the first.
    func poll(into raw: UnsafeMutableRawPointer?, capacity: Int, stride: Int, timeout: UInt64) -> Int {
        if timeout == 0 { for device in devices { device.callerPolled() } }
        var waited = false
        if signal.locked({ done.isEmpty }) {
            for device in devices { device.tryProgress() }
            if timeout > 0 && signal.locked({ done.isEmpty }) {
                if devices.count == 1 && devices[0].callerPolling {
                    // A caller that was polling waits on the CQ itself (one device: one channel).
                    devices[0].waitAsCaller(nanoseconds: timeout)
                    waited = true
                } else {
                    for device in devices { device.callerWaits() }
                }
            }
        }
        return signal.locked {
            if done.isEmpty && timeout > 0 && !waited { signal.wait(nanoseconds: timeout) }
            let n = min(capacity, done.count)
            for i in 0..<n { raw!.storeBytes(of: done[i], toByteOffset: i * stride, as: te_completion.self) }
            done.removeFirst(n)
            return n
        }
    }
}
