import CEFAShim
import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The efa transport: libfabric reliable-datagram endpoints (FI_EP_RDM) with
// one-sided RMA, as the official engine's EFA transport uses them on AWS.
// The provider is `efa` unless MC_EFA_PROVIDER (or FI_PROVIDER) names
// another RDM+RMA provider, e.g. `tcp;ofi_rxm` or `shm` for machines without EFA.

private func write(_ text: String, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let out else { return TE_OK }
    let bytes = Array(text.utf8)
    out.pointee.length = bytes.count
    guard let data = out.pointee.data, out.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
    for (i, byte) in bytes.enumerated() { data[i] = CChar(bitPattern: byte) }
    data[bytes.count] = 0
    return TE_OK
}

private func instance(_ pointer: OpaquePointer?) -> EFAInstance? {
    pointer.map { Unmanaged<EFAInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

/// What probe and create decide: the domains to open, or why none.
private enum Discovery {
    case found([efa_domain_info])
    case absent(reason: String, hint: String)

    static func run(_ options: EFAOptions) -> Discovery {
        let library = "libfabric \(String(cString: efa_library_version()))"
        let otherProviders = "set MC_EFA_PROVIDER to a software provider ('tcp;ofi_rxm' or 'shm') to run without EFA hardware"
        switch options.listDomains() {
        case .failure(let error):
            let hint = options.provider == "efa"
                ? "run on an instance with an EFA device and the efa kernel driver loaded, or \(otherProviders)"
                : "check that \(library) has the '\(options.provider)' provider (fi_info -l)"
            return .absent(reason: "\(library) offers no '\(options.provider)' RDM endpoint with RMA here (fi_getinfo: \(error))", hint: hint)
        case .success(let domains):
            if domains.isEmpty {
                return .absent(reason: "\(library) lists no '\(options.provider)' domains", hint: otherProviders)
            }
            let (chosen, missing) = options.choose(from: domains)
            let available = domains.map { EFAOptions.deviceName(domain: $0.domainName) }.joined(separator: ", ")
            if chosen.isEmpty {
                return .absent(reason: "device(s) \(missing.joined(separator: ", ")) not found; '\(options.provider)' offers: \(available)",
                               hint: "set device_name to one of those, or to auto-discovery")
            }
            return .found(chosen)
        }
    }
}

private func efaProbe(_ json: UnsafePointer<CChar>?, _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    let options = EFAOptions(json: json)
    switch Discovery.run(options) {
    case .absent(let why, let fix):
        _ = write(why, reason)
        _ = write(fix, hint)
        return TE_ERR_HARDWARE_ABSENT
    case .found(let domains):
        let names = domains.map { EFAOptions.deviceName(domain: $0.domainName) }.joined(separator: ",")
        _ = write("provider \(options.provider): devices \(names)", reason)
        _ = write("", hint)
        return TE_OK
    }
}

private func efaCreate(_ json: UnsafePointer<CChar>?, _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return TE_ERR_INVALID_ARGUMENT }
    let options = EFAOptions(json: json)
    let object = EFAInstance(options: options, host: host)
    guard case .found(let domains) = Discovery.run(options) else {
        object.log(TE_LOG_ERROR, "efa plugin: no usable device (run probe for the reason)")
        return TE_ERR_HARDWARE_ABSENT
    }
    if let wanted = options.devices, wanted.count > domains.count {
        object.log(TE_LOG_WARNING, "efa plugin: some requested devices are missing; using \(domains.map(\.domainName).joined(separator: ","))")
    }
    do {
        try object.open(domains: domains)
    } catch {
        object.log(TE_LOG_ERROR, "efa plugin: \(error.text)")
        return TE_ERR_NO_RESOURCES
    }
    for context in object.contexts {
        let mode = context.virtualAddressing ? "virtual addresses" : "offsets"
        object.log(TE_LOG_INFO, "efa plugin: provider \(context.info.providerName), device \(context.name) (domain \(context.info.domainName), fabric \(context.info.fabricName)), mr_mode 0x\(String(context.info.mr_mode, radix: 16)) (\(mode)), max message \(context.info.max_msg_size), tx depth \(context.info.tx_size)")
    }
    out.pointee = OpaquePointer(Unmanaged.passRetained(object).toOpaque())
    return TE_OK
}

private func efaDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<EFAInstance>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().close()
    object.release()
}

private func efaLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.descriptorFragment(), out)
}

private func efaRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), length > 0 else { return TE_ERR_INVALID_ARGUMENT }
    let (status, fragment) = object.register(address: address, length: length)
    return status == TE_OK ? write(fragment, out) : status
}

private func efaUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let object = instance(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return object.unregister(address: address)
}

private func efaOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let object = instance(pointer), let segment, let descriptor, let out else { return TE_ERR_INVALID_ARGUMENT }
    let (status, handle) = object.openPeer(segment: String(cString: segment), descriptorJSON: String(cString: descriptor))
    out.pointee = handle
    return status
}

private func efaClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) {
    instance(pointer)?.closePeer(peer)
}

private func efaOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let object = instance(pointer), let request else { return TE_ERR_INVALID_ARGUMENT }
    return write(object.answerHandshake(String(cString: request)), reply)
}

private func efaSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                       _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let accepted, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    var taken = 0
    let status = object.submit(UnsafeRawPointer(requests), count: count, stride: stride, accepted: &taken)
    accepted.pointee = taken
    return status
}

private func efaPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                     _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let object = instance(pointer), let count, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return TE_ERR_INVALID_ARGUMENT
    }
    count.pointee = object.poll(into: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride, timeout: timeout)
    return TE_OK
}

private func efaLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let object = instance(pointer) else { return nil }
    return object.lastErrorText
}

private func staticText(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

nonisolated(unsafe) private let descriptor: UnsafeMutablePointer<te_plugin_descriptor> = {
    let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
    pointer.initialize(to: te_plugin_descriptor(
        abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
        name: staticText("efa"), version: staticText("0.1.0"), protocols: staticText("efa"),
        capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_NEEDS_HANDSHAKE | TE_CAP_SPLITS_REQUESTS,
        probe: efaProbe, create: efaCreate, destroy: efaDestroy, local_descriptor: efaLocalDescriptor,
        register_memory: efaRegister, unregister_memory: efaUnregister, open_peer: efaOpenPeer, close_peer: efaClosePeer,
        on_handshake: efaOnHandshake, submit: efaSubmit, poll: efaPoll, last_error: efaLastError,
        allocate_memory: nil, free_memory: nil))
    return pointer
}()

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> {
    UnsafePointer(descriptor)
}
