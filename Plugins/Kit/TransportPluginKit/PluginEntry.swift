import CTransportABI

/// Builds a plugin's C descriptor. The plugin passes two closure literals that name its type
/// (C function pointers cannot be generic); every other entry is the kit's:
///
///     nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
///         name: "loop", version: "0.1.0", protocols: "loop", capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE,
///         probe: { PluginEntry.probe(LoopPlugin.self, $0, $1, $2) },
///         create: { PluginEntry.create(LoopPlugin.self, $0, $1, $2) })
///
///     @_cdecl("te_transport_plugin_entry")
///     public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
public enum PluginDescriptor {
    /// The C type of `probe`.
    public typealias ProbeEntry = @convention(c) (UnsafePointer<CChar>?, UnsafeMutablePointer<te_buffer>?, UnsafeMutablePointer<te_buffer>?) -> Int32
    /// The C type of `create`.
    public typealias CreateEntry = @convention(c) (UnsafePointer<CChar>?, UnsafePointer<te_host_services>?, UnsafeMutablePointer<OpaquePointer?>?) -> Int32

    /// A descriptor of this header's size and version; `allocatesMemory` offers
    /// `allocate_memory`/`free_memory` (the instance's `allocate` and `free`).
    public static func make(name: StaticString, version: StaticString, protocols: StaticString, capabilities: UInt64,
                            allocatesMemory: Bool = false, probe: ProbeEntry, create: CreateEntry) -> UnsafePointer<te_plugin_descriptor> {
        let pointer = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
        pointer.initialize(to: te_plugin_descriptor(
            abi_major: UInt16(TE_ABI_MAJOR), abi_minor: UInt16(TE_ABI_MINOR), struct_size: UInt32(MemoryLayout<te_plugin_descriptor>.size),
            name: CText.pointer(name), version: CText.pointer(version), protocols: CText.pointer(protocols), capabilities: capabilities,
            probe: probe, create: create, destroy: kitDestroy, local_descriptor: kitLocalDescriptor,
            register_memory: kitRegister, unregister_memory: kitUnregister, open_peer: kitOpenPeer, close_peer: kitClosePeer,
            on_handshake: kitOnHandshake, submit: kitSubmit, poll: kitPoll, last_error: kitLastError,
            allocate_memory: allocatesMemory ? kitAllocate : nil, free_memory: allocatesMemory ? kitFree : nil, stats: kitStats))
        return UnsafePointer(pointer)
    }
}

/// The generic halves of `probe` and `create`, called from the plugin's two closures.
public enum PluginEntry {
    /// `probe`: the plugin's answer written into `reason` and `hint`.
    public static func probe<P: TransportPlugin>(_ plugin: P.Type, _ options: UnsafePointer<CChar>?,
                                                 _ reason: UnsafeMutablePointer<te_buffer>?, _ hint: UnsafeMutablePointer<te_buffer>?) -> Int32 {
        let answer = P.probe(options: options.map { String(cString: $0) })
        let wroteReason = CText.write(answer.reason, to: reason)
        let wroteHint = CText.write(answer.hint, to: hint)
        // A too-small buffer is the caller's to retry; the probe's own verdict wins otherwise.
        if answer.status == TE_OK, wroteReason != TE_OK || wroteHint != TE_OK { return TE_ERR_BUFFER_TOO_SMALL }
        return answer.status
    }

    /// `create`: a new instance behind `out`; a failure is logged through the host (there is no
    /// instance yet whose `last_error` could say it).
    public static func create<P: TransportPlugin>(_ plugin: P.Type, _ options: UnsafePointer<CChar>?,
                                                  _ host: UnsafePointer<te_host_services>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
        let services = HostServices(host)
        guard let out else { return TE_ERR_INVALID_ARGUMENT }
        out.pointee = nil
        do {
            let instance = try P.create(options: options.map { String(cString: $0) }, host: services)
            out.pointee = OpaquePointer(Unmanaged.passRetained(InstanceBox(instance)).toOpaque())
            return TE_OK
        } catch {
            services.log(TE_LOG_ERROR, error.message)
            return error.status
        }
    }
}

/// What the host's `te_instance *` points at.
final class InstanceBox {
    let instance: any TransportInstance
    let id = LastError.newInstanceID()
    /// Handshake answers that did not fit the host's buffer, for its retry with the same request
    /// (so an answer that did work, e.g. relayed I/O, is not worked out twice).
    private var stash: [String: String] = [:]
    private let stashLock = Signal()

    /// The answer kept for `request`, taken.
    func takeStashed(_ request: String) -> String? { stashLock.locked { stash.removeValue(forKey: request) } }

    /// Keeps an answer for the host's retry (a few at most: a retry follows at once).
    func stashAnswer(_ answer: String, for request: String) {
        stashLock.locked {
            if stash.count >= 64 { stash.removeAll() }
            stash[request] = answer
        }
    }

    init(_ instance: any TransportInstance) { self.instance = instance }

    /// Runs `body`, turning a thrown failure into its status and this thread's last error.
    @inline(__always)
    func run(_ body: (any TransportInstance) throws(PluginFailure) -> Int32) -> Int32 {
        do { return try body(instance) } catch {
            LastError.set(error.message, instance: id)
            return error.status
        }
    }

    /// Records a failure the kit itself found (a bad argument) and returns its status.
    func refuse(_ status: Int32, _ message: String) -> Int32 {
        LastError.set(message, instance: id)
        return status
    }
}

@inline(__always)
private func box(_ pointer: OpaquePointer?) -> InstanceBox? {
    pointer.map { Unmanaged<InstanceBox>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

private func kitDestroy(_ pointer: OpaquePointer?) {
    guard let pointer else { return }
    let object = Unmanaged<InstanceBox>.fromOpaque(UnsafeRawPointer(pointer))
    object.takeUnretainedValue().instance.close()
    object.release()
}

private func kitLocalDescriptor(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return box.run { instance throws(PluginFailure) in CText.write(try instance.localDescriptor(), to: out) }
}

private func kitStats(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return box.run { instance throws(PluginFailure) in
        guard let figures = try instance.stats() else { throw .notSupported("this instance keeps no per-device figures") }
        return CText.write(figures, to: out)
    }
}

private func kitRegister(_ pointer: OpaquePointer?, _ address: UInt64, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard length > 0, address <= UInt64.max - length else {
        return box.refuse(TE_ERR_INVALID_ARGUMENT, "register_memory: [0x\(String(address, radix: 16)), +\(length)) is empty or wraps around")
    }
    return box.run { instance throws(PluginFailure) in
        let fragment = try instance.register(address: address, length: length, location: CText.read(location, or: "*"))
        let status = CText.write(fragment, to: out)
        // The host asks again with a larger buffer: that second register must find nothing exposed.
        if status != TE_OK { instance.registrationNotDelivered(address: address, fragment: fragment) }
        return status
    }
}

private func kitUnregister(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return box.run { instance throws(PluginFailure) in
        try instance.unregister(address: address)
        return TE_OK
    }
}

private func kitOpenPeer(_ pointer: OpaquePointer?, _ segment: UnsafePointer<CChar>?, _ descriptor: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard let segment, let descriptor, let out else { return box.refuse(TE_ERR_INVALID_ARGUMENT, "open_peer: a NULL argument") }
    out.pointee = 0
    return box.run { instance throws(PluginFailure) in
        let handle = try instance.openPeer(segment: String(cString: segment), descriptor: String(cString: descriptor))
        guard handle != 0 else { throw PluginFailure(TE_ERR_INTERNAL, "open_peer produced the handle 0") }
        out.pointee = handle
        return TE_OK
    }
}

private func kitClosePeer(_ pointer: OpaquePointer?, _ peer: UInt64) { box(pointer)?.instance.closePeer(peer) }

private func kitOnHandshake(_ pointer: OpaquePointer?, _ request: UnsafePointer<CChar>?, _ reply: UnsafeMutablePointer<te_buffer>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard let request else { return box.refuse(TE_ERR_INVALID_ARGUMENT, "on_handshake: no request") }
    let text = String(cString: request)
    return box.run { instance throws(PluginFailure) in
        let answer: String
        if let kept = box.takeStashed(text) { answer = kept } else { answer = try instance.answerHandshake(text) }
        let status = CText.write(answer, to: reply)
        if status == TE_ERR_BUFFER_TOO_SMALL { box.stashAnswer(answer, for: text) }
        return status
    }
}

private func kitSubmit(_ pointer: OpaquePointer?, _ requests: UnsafePointer<te_request>?, _ count: Int, _ stride: Int,
                       _ accepted: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard let accepted, count >= 0, count == 0 || requests != nil, stride >= MemoryLayout<te_request>.size else {
        return box.refuse(TE_ERR_INVALID_ARGUMENT, "submit: no accepted counter, no requests, or a stride below \(MemoryLayout<te_request>.size)")
    }
    accepted.pointee = 0
    var taken = 0
    defer { accepted.pointee = taken }
    return box.run { instance throws(PluginFailure) in
        try instance.submit(RequestArray(base: UnsafeRawPointer(requests), count: count, stride: stride), accepted: &taken)
        return TE_OK
    }
}

private func kitPoll(_ pointer: OpaquePointer?, _ out: UnsafeMutablePointer<te_completion>?, _ capacity: Int, _ stride: Int,
                     _ timeout: UInt64, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard let count, capacity >= 0, capacity == 0 || out != nil, stride >= MemoryLayout<te_completion>.size else {
        return box.refuse(TE_ERR_INVALID_ARGUMENT, "poll: no count, no array, or a stride below \(MemoryLayout<te_completion>.size)")
    }
    count.pointee = 0
    return box.run { instance throws(PluginFailure) in
        count.pointee = try instance.poll(into: CompletionArray(base: UnsafeMutableRawPointer(out), capacity: capacity, stride: stride),
                                          timeout: timeout)
        return TE_OK
    }
}

private func kitLastError(_ pointer: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let box = box(pointer) else { return CText.pointer("no instance") }
    return LastError.text(instance: box.id)
}

private func kitAllocate(_ pointer: OpaquePointer?, _ length: UInt64, _ location: UnsafePointer<CChar>?,
                         _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    guard let out, length > 0 else { return box.refuse(TE_ERR_INVALID_ARGUMENT, "allocate_memory: no output or a zero length") }
    out.pointee = 0
    return box.run { instance throws(PluginFailure) in
        out.pointee = try instance.allocate(length: length, location: CText.read(location, or: "*"))
        return TE_OK
    }
}

private func kitFree(_ pointer: OpaquePointer?, _ address: UInt64) -> Int32 {
    guard let box = box(pointer) else { return TE_ERR_INVALID_ARGUMENT }
    return box.run { instance throws(PluginFailure) in
        try instance.free(address: address)
        return TE_OK
    }
}
