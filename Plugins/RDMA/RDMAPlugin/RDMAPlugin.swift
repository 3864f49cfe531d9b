import CRDMAShim
import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The rdma transport: libibverbs RC queue pairs with one-sided RDMA WRITE/READ,
// upstream's descriptor (devices, per-device rkey/lkey, priority_matrix) and
// Connection handshake (local_nic_path, peer_nic_path, local_lid, local_gid,
// qp_num, reply_msg), so an official engine running RDMA can talk to it.

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    for (i, byte) in bytes.enumerated() { data[i] = CChar(bitPattern: byte) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> RDMAInstance? {
    pointer.map { Unmanaged<RDMAInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

private func rdmaProbe(_ json: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    switch Discovery.run(RDMAOptions(json: json)) {
    case .absent(let why, let fix):
        _ = write(why, reason)
        _ = write(fix, hint)
        return TE_ERR_HARDWARE_ABSENT
    case .found(let devices):
        let names = devices.map { "\($0.name) (port \($0.info.port), GID index \($0.gid.index))" }.joined(separator: ", ")
        _ = write("devices \(names)", reason)
        _ = write("", hint)
        return TE_OK
    }
}

private func rdmaCreate(_ json: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return TE_ERR_INVALID_ARGUMENT }
    let options = RDMAOptions(json: json)
    let object = RDMAInstance(options: options, host: host)
    guard case .found(let found) = Discovery.run(options) else {
        object.log(TE_LOG_ERROR, "rdma plugin: no usable device (run probe for the reason)")
        return TE_ERR_HARDWARE_ABSENT
    }
    if let failure = object.open(found) {
        object.log(TE_LOG_ERROR, "rdma plugin: \(failure)")
        return TE_ERR_NO_RESOURCES
    }
    for device in object.devices {
        let gid = JSONText.gid(device.gidBytes)
        let kind = device.discovered.gid.type == UInt32(RDMA_GID_ROCE_V2) ? "RoCE v2" : device.discovered.gid.type == UInt32(RDMA_GID_ROCE_V1) ? "RoCE v1" : "IB"
        object.log(TE_LOG_INFO, "rdma plugin: device \(device.name) port \(device.discovered.info.port), GID index \(device.discovered.gid.index) (\(kind)) \(gid), lid \(device.discovered.info.lid), MTU enum \(device.mtu), NUMA node \(device.discovered.numaNode), \(options.queuePairsPerEndpoint) QPs per endpoint, slices of \(options.sliceSize) bytes")
    }
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    return TE_OK
}

private func rdmaDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<RDMAInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().close()
    object.release()
}

private func rdmaLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.descriptorFragment(), out)
}

private func rdmaRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    let (status, fragment) = object.register(address: address, length: length, location: location.map { String(cString: $0) } ?? "*")
    return status == TE_OK ? write(fragment, out) : status
}

private func rdmaUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return object.unregister(address: address)
}

private func rdmaOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let segment, let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let (status, handle) = object.openPeer(segment: String(cString: segment), descriptorJSON: String(cString: descriptor))
    out.pointee = handle
    return status
}

private func rdmaClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) {
    instance(pointer)?.closePeer(peer)
}

private func rdmaOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), let request else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.answerHandshake(String(cString: request)), reply)
}

private func rdmaSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                       _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    var taken = 0
    let status = object.submit(UnsafeRawPointer(requests), count: count, stride: stride, accepted: &taken)
    accepted.pointee = taken
    return status
}

private func rdmaPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                     _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    count.pointee = object.poll(into: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride, timeout: timeout)
    return TE_OK
}

private func rdmaLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let object = instance(pointer) else { return nil }
    return object.lastErrorText
}

private func rdmaAllocate(_ pointer: OpaquePointer?, _ length: UInt64, _ location: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let out, length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    let (status, address) = object.allocate(length: length, location: location.map { String(cString: $0) } ?? "")
    out.pointee = address
    return status
}

private func rdmaFree(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return object.free(address: address)
}

private func staticText(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: staticText("rdma"), version: staticText("0.1.0"), protocols: staticText("rdma"),
        capabilities: TE_CAP_MEM_HOST | TE_CAP_MEM_DEVICE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_NEEDS_HANDSHAKE | TE_CAP_SPLITS_REQUESTS,
        probe: rdmaProbe, create: rdmaCreate, destroy: rdmaDestroy, local_descriptor: rdmaLocalDescriptor,
        register_memory: rdmaRegister, unregister_memory: rdmaUnregister, open_peer: rdmaOpenPeer, close_peer: rdmaClosePeer,
        on_handshake: rdmaOnHandshake, submit: rdmaSubmit, poll: rdmaPoll, last_error: rdmaLastError,
        allocate_memory: rdmaAllocate, free_memory: rdmaFree))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
