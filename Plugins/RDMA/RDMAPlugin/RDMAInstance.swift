import CRDMAShim
import CTransportABI
import TransportPluginKit
import RDMATopology
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One plugin instance: the opened devices, registrations, peers, requests in
/// flight, and a repair thread that rebuilds failed endpoints and retries their slices.
final class RDMAInstance: TransportInstance, @unchecked Sendable {
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

    let options: RDMAOptions
    let host: HostServices
    private(set) var devices: [RDMADevice] = []
    /// Guards the state below. The mutex makes each access exclusive, so the properties opt out
    /// of Swift's runtime exclusivity checks (a thread-local lookup per access, a tenth of a
    /// small transfer's CPU time in profiles).
    let signal = Signal()
    /// The repair thread waits here, so a completion wakes no repair thread (pollers wait on the
    /// signal's main condition).
    let repairNeeded: Signal.Condition
    @exclusivity(unchecked) var peers: [UInt64: Peer] = [:]
    @exclusivity(unchecked) var nextPeer: UInt64 = 1
    @exclusivity(unchecked) var registrations: [Registration] = []
    @exclusivity(unchecked) var parents = PartedRequests()
    @exclusivity(unchecked) var done = CompletionQueue()
    @exclusivity(unchecked) var nextDevice = 0
    /// location -> preferred local device indices (upstream's priority matrix, by NUMA node).
    var preferred: [String: [Int]] = [:]
    @exclusivity(unchecked) var repairQueue: [Part] = []
    @exclusivity(unchecked) var stopping = false
    @exclusivity(unchecked) var repairRunning = false

    init(options: RDMAOptions, host: HostServices) {
        repairNeeded = signal.makeCondition()
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
            repairNeeded.broadcast()
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

    func log(_ level: Int32, _ text: String) { host.log(level, text) }

    // MARK: Descriptor

    func nicPath(_ device: RDMADevice) -> String { "\(options.segmentName)@\(device.name)" }

    /// Per opened device: bytes of completed slices each way, bytes posted and not completed,
    /// failed posts and work completions.
    func stats() -> String? { DeviceCounters.report(devices.map(\.counters)) }

    /// `devices` and `priority_matrix` as upstream publishes them.
    func localDescriptor() -> String {
        let list = devices.map { device in
            "{\"name\":\(JSONFragment.string(device.name)),\"lid\":\(device.discovered.info.lid),\"gid\":\(JSONFragment.string(GIDText.gid(device.gidBytes)))}"
        }.joined(separator: ",")
        let matrix = preferred.keys.sorted().map { location -> String in
            let chosen = preferred[location] ?? []
            let first = chosen.map { JSONFragment.string(devices[$0].name) }.joined(separator: ",")
            let rest = devices.indices.filter { !chosen.contains($0) }.map { JSONFragment.string(devices[$0].name) }.joined(separator: ",")
            return "\(JSONFragment.string(location)):[[\(first)],[\(rest)]]"
        }.joined(separator: ",")
        return "{\"devices\":[\(list)],\"priority_matrix\":{\(matrix)}}"
    }

    // MARK: Memory

    /// Managed buffers this plugin allocated: address -> CUDA ordinal (nil: host memory).
    private var allocations: [UInt64: Int?] = [:]

    /// A managed buffer: device memory for `cuda:N` (registered through GPUDirect RDMA),
    /// page-aligned host memory for any other location.
    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        var pointer: UnsafeMutableRawPointer?
        var ordinal: Int? = nil
        if location.hasPrefix("cuda:") {
            guard let index = Int(location.dropFirst(5)), index >= 0 else { throw .invalid("\(location): not a CUDA device location (cuda:N)") }
            let status = rdma_cuda_alloc(Int32(index), Int(length), &pointer)
            guard status == 0, pointer != nil else {
                let code = status == -ENOMEM ? TE_ERR_NO_RESOURCES : TE_ERR_HARDWARE_ABSENT
                switch status {
                case -ENOSYS: throw PluginFailure(code, "\(location) memory needs the CUDA driver (libcuda.so.1): not installed, or it found no usable GPU")
                case -ENODEV: throw PluginFailure(code, "no CUDA device \(index)")
                default: throw PluginFailure(code, "cuMemAlloc of \(length) bytes on \(location) failed")
                }
            }
            ordinal = index
        } else {
            guard posix_memalign(&pointer, 4096, Int(length)) == 0, pointer != nil else { throw .noResources("posix_memalign of \(length) bytes failed") }
        }
        let address = UInt64(UInt(bitPattern: pointer))
        signal.locked { allocations[address] = ordinal }
        return address
    }

    /// Frees a managed buffer (the host unregistered it first).
    func free(address: UInt64) throws(PluginFailure) {
        guard let ordinal = signal.locked({ allocations.removeValue(forKey: address) }) else {
            throw .invalid("0x\(String(address, radix: 16)) was not allocated by this plugin")
        }
        let pointer = UnsafeMutableRawPointer(bitPattern: UInt(address))
        if let ordinal {
            guard rdma_cuda_free(Int32(ordinal), pointer) == 0 else { throw PluginFailure(TE_ERR_INTERNAL, "cuMemFree of 0x\(String(address, radix: 16)) failed") }
            return
        }
        Glibc.free(pointer)
    }

    func register(address: UInt64, length: UInt64, location requested: String) throws(PluginFailure) -> String {
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
                throw .noResources(text)
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
        return "{\"rkey\":[\(registration.rkeys.map(String.init).joined(separator: ","))],\"lkey\":[\(registration.lkeys.map(String.init).joined(separator: ","))]}"
    }

    func unregister(address: UInt64) throws(PluginFailure) {
        let removed = signal.locked { () -> Registration? in
            guard let index = registrations.firstIndex(where: { $0.address == address }) else { return nil }
            return registrations.remove(at: index)
        }
        guard let removed else { throw .invalid("no registration starts at 0x\(String(address, radix: 16))") }
        for region in removed.regions { _ = rdma_dereg_mr(region) }
    }
}
