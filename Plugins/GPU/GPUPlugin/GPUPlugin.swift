import CGPUShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The nvlink, nvlink_intra and hip transports: GPU memory of a peer mapped into
// this process (a CUDA or HIP IPC handle on the same host, a CUDA fabric handle
// across an NVLink domain) and copied with cuMemcpy / hipMemcpy on copy threads.
// One plugin file per protocol, all built from this module; the host says which
// in "protocol".

/// Boot id of this host: IPC handles only open on the same host.
let bootID: String = BootID.current

func runtimeError(_ result: Int32) -> String { String(cString: gpu_error_name(result)) }

/// One plugin instance.
final class GPUInstance: TransportInstance, @unchecked Sendable {
    struct Job {
        var cookie: UInt64
        var destination: UInt64
        var source: UInt64
        var length: UInt64
    }

    let options: GPUOptions
    let host: HostServices
    /// Guards peers, mappings and allocations.
    private let queue = Signal()
    private let finished = Signal()
    private let copiers = WorkerPool<Job>()
    private var done = CompletionQueue()
    private var peers: [UInt64: PeerSegment] = [:]
    private var nextPeer: UInt64 = 1
    /// Peer allocations mapped here, by handle text: where they start in this process and their size.
    private var mapped: [String: (address: UInt64, size: UInt64)] = [:]
    /// Memory this engine allocated for managed buffers: size (fabric mappings) or 0 (cuMemAlloc).
    private var allocations: [UInt64: UInt64] = [:]

    init(options: GPUOptions, host: HostServices) {
        self.options = options
        self.host = host
    }

    func start() -> Bool {
        copiers.start(count: options.workers, name: "te-gpu-copy") { [self] in
            let bound = gpu_bind_device(options.device)
            return { [self] job in copy(job, bound: bound) }
        }
    }

    func close() {
        copiers.stop()
        _ = gpu_bind_device(options.device)
        for (_, mapping) in mapped {
            if options.mode.sameHostOnly { _ = gpu_ipc_close(mapping.address) } else { _ = gpu_fabric_unmap(mapping.address, mapping.size) }
        }
        mapped.removeAll()
        for (address, size) in allocations { if size == 0 { _ = gpu_free(address) } else { _ = gpu_fabric_unmap(address, size) } }
        allocations.removeAll()
    }

    func localDescriptor() -> String {
        "{\"gpu_boot_id\":\"\(bootID)\",\"gpu_handle_type\":\"\(options.mode.handleType)\",\"gpu_device\":\(options.device)}"
    }

    /// Device memory gets its allocation's handle; host memory is reached over TCP.
    func register(address: UInt64, length: UInt64, location: String) throws(PluginFailure) -> String {
        var status = gpu_bind_device(options.device)
        var isDevice: Int32 = 0, device: Int32 = 0
        var base: UInt64 = 0, size: UInt64 = 0
        if status == 0 { status = gpu_pointer_info(address, &isDevice, &device, &base, &size) }
        guard status == 0 else {
            throw .invalid("cuPointerGetAttribute(0x\(String(address, radix: 16))): \(runtimeError(status))")
        }
        if isDevice == 0 { return "{\"protocol\":\"tcp\"}" }
        var handle = [UInt8](repeating: 0, count: Int(GPU_HANDLE_BYTES))
        status = options.mode.sameHostOnly ? gpu_ipc_export(base, &handle) : gpu_fabric_export(address, &handle)
        guard status == 0 else {
            let how = options.mode.sameHostOnly ? "IPC handle" : "cuMemExportToShareableHandle (fabric; the memory must come from cuMemCreate with CU_MEM_HANDLE_TYPE_FABRIC, e.g. a managed buffer)"
            throw .notSupported("\(how) for 0x\(String(address, radix: 16)): \(runtimeError(status))")
        }
        return "{\"protocol\":\"\(options.mode.rawValue)\",\"shm_name\":\"\(HandleText.encode(handle))\",\"gpu_offset\":\(address - base),\"gpu_alloc_size\":\(size),\"gpu_device\":\(device)}"
    }

    /// IPC and fabric handles stay valid while the peer maps them; nothing to revoke here.
    func unregister(address: UInt64) {}

    func openPeer(segment: String, descriptor json: String) throws(PluginFailure) -> UInt64 {
        let peer: PeerSegment
        do { peer = try PeerSegment(json: json) } catch { throw .invalid("\(segment): \(error)") }
        if let reason = peer.unreachableReason(mode: options.mode, localBootID: bootID) { throw .unreachable("\(segment): \(reason)") }
        return queue.locked {
            defer { nextPeer += 1 }
            peers[nextPeer] = peer
            return nextPeer
        }
    }

    func closePeer(_ handle: UInt64) { queue.locked { _ = peers.removeValue(forKey: handle) } }

    /// Where a peer buffer's allocation is mapped in this process (mapping it on first use).
    /// Returns the mapping's start and size: for an IPC handle the size of the allocation the
    /// driver actually opened (the descriptor's `gpu_alloc_size` is only the peer's word), for a
    /// fabric import the size mapped.
    private func mapping(of buffer: PeerBuffer) -> (address: UInt64?, size: UInt64, status: Int32) {
        let key = HandleText.encode(buffer.handle)
        if let known = queue.locked({ mapped[key] }) { return (known.address, known.size, 0) }
        var status = gpu_bind_device(options.device)
        var address: UInt64 = 0
        var size = buffer.allocationSize
        if status == 0 {
            status = buffer.handle.withUnsafeBufferPointer { handle in
                options.mode.sameHostOnly ? gpu_ipc_open(handle.baseAddress!, &address)
                    : gpu_fabric_import(handle.baseAddress!, buffer.allocationSize, options.device, &address)
            }
        }
        if status == 0, options.mode.sameHostOnly {
            var isDevice: Int32 = 0, device: Int32 = 0, base: UInt64 = 0, opened: UInt64 = 0
            status = gpu_pointer_info(address, &isDevice, &device, &base, &opened)
            // The handle may open an interior pointer of its allocation: what lies past `address`.
            if status == 0, base <= address, address - base <= opened { size = opened - (address - base) } else {
                if status == 0 { status = -1 }
                _ = gpu_ipc_close(address)
            }
        }
        guard status == 0 else { return (nil, 0, status) }
        return queue.locked {
            if let raced = mapped[key] {  // another thread mapped it meanwhile: keep one
                if options.mode.sameHostOnly { _ = gpu_ipc_close(address) } else { _ = gpu_fabric_unmap(address, buffer.allocationSize) }
                return (raced.address, raced.size, 0)
            }
            mapped[key] = (address, size)
            return (address, size, 0)
        }
    }

    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        var batch: [Job] = []
        // Requests checked before a refused one still run.
        defer { copiers.enqueue(contentsOf: batch) }
        for (i, request) in requests.enumerated() {
            guard request.length > 0, request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE,
                  let peer = queue.locked({ peers[request.peer] }) else {
                throw .invalid("bad request (opcode \(request.opcode), length \(request.length), peer \(request.peer))")
            }
            guard let buffer = peer.buffer(containing: request.remote_addr, length: request.length) else {
                throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside one of the peer's GPU buffers")
            }
            let (mappedBase, mappedSize, status) = mapping(of: buffer)
            guard let base = mappedBase else {
                throw .unreachable("cannot map the peer's GPU buffer: \(runtimeError(status))")
            }
            // The descriptor checked offset + length against its own gpu_alloc_size; the mapping
            // must hold them too, and the address sum must not wrap.
            let inside = request.remote_addr - buffer.address
            let (start, wrapped) = base.addingReportingOverflow(buffer.offset + inside)
            guard buffer.offset + buffer.length <= mappedSize, !wrapped, !start.addingReportingOverflow(request.length).overflow else {
                throw .outOfRange("the peer's GPU buffer (offset \(buffer.offset), \(buffer.length) bytes) lies outside the \(mappedSize)-byte allocation opened")
            }
            let remote = start
            let write = request.opcode == TE_OP_WRITE
            batch.append(Job(cookie: request.cookie, destination: write ? remote : request.local_addr,
                             source: write ? request.local_addr : remote, length: request.length))
            accepted = i + 1
        }
    }

    /// Copies one job on a copy thread (`bound`: that thread's device binding, 0 when it worked).
    private func copy(_ job: Job, bound: Int32) {
        let status = bound != 0 ? bound : gpu_copy(job.destination, job.source, job.length)
        if status != 0 { host.log(TE_LOG_WARNING, "gpu plugin: cuMemcpy of \(job.length) bytes: \(runtimeError(status))") }
        finished.locked {
            done.complete(job.cookie, status: status == 0 ? TE_OK : TE_ERR_IO, bytes: status == 0 ? job.length : 0)
            finished.broadcast()
        }
    }

    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        finished.locked {
            if done.isEmpty && timeout > 0 { finished.wait(nanoseconds: timeout) }
            return done.drain(into: out)
        }
    }

    /// Device memory that this protocol can export: cuMemAlloc / hipMalloc for IPC, cuMemCreate with a fabric handle for MNNVL.
    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        // Host locations keep the host's own allocator.
        guard location.hasPrefix(options.mode.locationPrefix) else { throw .notSupported("\(location) is not GPU memory") }
        var status = gpu_bind_device(options.device)
        var address: UInt64 = 0, size: UInt64 = 0
        if status == 0 { status = options.mode.sameHostOnly ? gpu_alloc(length, &address) : gpu_fabric_alloc(options.device, length, &address, &size) }
        guard status == 0 else {
            throw .noResources("allocating \(length) bytes on \(options.mode.locationPrefix)\(options.device): \(runtimeError(status))")
        }
        queue.locked { allocations[address] = size }
        return address
    }

    func free(address: UInt64) throws(PluginFailure) {
        guard let size = queue.locked({ allocations.removeValue(forKey: address) }) else {
            throw .invalid("0x\(String(address, radix: 16)) was not allocated by this plugin")
        }
        _ = gpu_bind_device(options.device)
        _ = size == 0 ? gpu_free(address) : gpu_fabric_unmap(address, size)
    }
}

/// Whether this machine can run `options.mode`, and why not.
enum Probe {
    static func run(_ options: GPUOptions) -> ProbeAnswer {
        let (status, reason, hint) = check(options)
        return ProbeAnswer(status, reason: reason, hint: hint)
    }

    private static func check(_ options: GPUOptions) -> (Int32, String, String) {
        let hip = options.mode == .hip
        guard gpu_use(options.mode.runtime) == 0 else {
            return (TE_ERR_NOT_SUPPORTED, "this build of the plugin has no HIP support (built without libamdhip64-dev)", "rebuild with libamdhip64-dev installed")
        }
        var error = [CChar](repeating: 0, count: 512)
        let loaded = gpu_load(options.library, &error, error.count)
        let text = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let runtime = hip ? "the HIP runtime" : "the CUDA driver"
        switch loaded {
        case 0: break
        case -1: return (TE_ERR_LIBRARY_MISSING, "\(runtime) is not installed (\(text))",
                         hip ? "install libamdhip64-5 (Debian) or ROCm, or set MC_HIP_LIBRARY" : "install the NVIDIA driver (libcuda.so.1) or set MC_CUDA_LIBRARY")
        case -2: return (TE_ERR_LIBRARY_MISSING, text, hip ? "install a complete HIP runtime" : "install an NVIDIA driver for CUDA 12 or newer")
        default: return (TE_ERR_HARDWARE_ABSENT, "no usable GPU (\(text))", hip ? "check rocm-smi and /dev/kfd permissions" : "check nvidia-smi and the driver")
        }
        var count: Int32 = 0
        let counted = gpu_device_count(&count)
        let name = "\(options.mode.locationPrefix)\(options.device)"
        guard counted == 0, count > options.device else {
            return (TE_ERR_HARDWARE_ABSENT, "\(name) does not exist (\(count) GPU(s)\(counted == 0 ? "" : ", \(runtimeError(counted))"))",
                    "set device_name to \(options.mode.locationPrefix)N with N below the device count")
        }
        if options.mode == .mnnvl {
            var supported: Int32 = 0
            let status = gpu_fabric_supported(options.device, &supported)
            guard status == 0, supported != 0 else {
                return (TE_ERR_HARDWARE_ABSENT, "\(name) cannot export fabric handles (no multi-node NVLink\(status == 0 ? "" : ": \(runtimeError(status))"))",
                        "use nvlink_intra for GPUs on one host, or rdma")
            }
        }
        var version: Int32 = 0
        _ = gpu_driver_version(&version)
        return (TE_OK, "\(count) GPU(s), driver version \(version), using \(name)", "")
    }
}
