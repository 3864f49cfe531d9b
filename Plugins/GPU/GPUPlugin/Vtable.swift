import CGPUShim
import CTransportABI

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    for (i, byte) in bytes.enumerated() { data[i] = CChar(bitPattern: byte) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> GPUInstance? {
    pointer.map { Unmanaged<GPUInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

private func options(_ json: UnsafePointer<CChar>?) -> Result<GPUOptions, GPUError> {
    guard let json else { return .success(GPUOptions()) }
    do { return .success(try GPUOptions(json: String(cString: json))) } catch let error as GPUError { return .failure(error) } catch {
        return .failure(GPUError("\(error)"))
    }
}

private func gpuProbe(_ json: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    switch options(json) {
    case .failure(let error):
        _ = write(error.description, reason)
        _ = write("device_name is cuda:N or hip:N", hint)
        return TE_ERR_INVALID_ARGUMENT
    case .success(let parsed):
        let (status, why, fix) = Probe.run(parsed)
        _ = write(why, reason)
        _ = write(fix, hint)
        return status
    }
}

private func gpuCreate(_ json: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out, case .success(let parsed) = options(json) else { return TE_ERR_INVALID_ARGUMENT }
    let (status, _, _) = Probe.run(parsed)
    guard status == TE_OK else { return status }
    let object = GPUInstance(options: parsed, host: host)
    guard object.start() else {
        object.close()
        return TE_ERR_NO_RESOURCES
    }
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    return TE_OK
}

private func gpuDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<GPUInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().close()
    object.release()
}

private func gpuLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.descriptorFragment, out)
}

private func gpuRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                            _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    let (status, fragment) = object.register(address, length)
    return status == TE_OK ? write(fragment, out) : status
}

private func gpuUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 { TE_OK }

private func gpuOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                            _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let segment, let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let (status, handle) = object.openPeer(String(cString: segment), String(cString: descriptor))
    out.pointee = handle
    return status
}

private func gpuClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) { instance(pointer)?.closePeer(peer) }

private func gpuOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    write("{\"reply_msg\":\"\"}", reply)
}

private func gpuSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                          _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    var taken = 0
    let status = object.submit(UnsafeRawPointer(requests), count: count, stride: stride, accepted: &taken)
    accepted.pointee = taken
    return status
}

private func gpuPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                        _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    count.pointee = object.poll(into: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride, timeout: timeout)
    return TE_OK
}

private func gpuLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? { instance(pointer)?.lastErrorText }

private func gpuAllocate(_ pointer: OpaquePointer?, _ length: UInt64, _ location: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let out, length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    // Host locations keep the host's own allocator.
    if let location, !String(cString: location).hasPrefix(object.options.mode.locationPrefix) { return TE_ERR_NOT_SUPPORTED }
    let (status, address) = object.allocate(length)
    out.pointee = address
    return status
}

private func gpuFree(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 { instance(pointer)?.free(address) ?? TE_ERR_INVALID_ARGUMENT }

private func staticText(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: staticText("gpu"), version: staticText("0.1.0"), protocols: staticText("nvlink,nvlink_intra,hip"),
        capabilities: TE_CAP_MEM_DEVICE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
        probe: gpuProbe, create: gpuCreate, destroy: gpuDestroy, local_descriptor: gpuLocalDescriptor,
        register_memory: gpuRegister, unregister_memory: gpuUnregister, open_peer: gpuOpenPeer, close_peer: gpuClosePeer,
        on_handshake: gpuOnHandshake, submit: gpuSubmit, poll: gpuPoll, last_error: gpuLastError,
        allocate_memory: gpuAllocate, free_memory: gpuFree))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
