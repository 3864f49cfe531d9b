import CTransportABI
import Synchronization

/// The host services a checked instance gets: handshakes go nowhere (no peer here), and every
/// call is counted, so a plugin that calls its host after `destroy` returned is caught.
final class CheckHost: @unchecked Sendable {
    let destroyed = Atomic<Bool>(false)
    let callsAfterDestroy = Atomic<Int>(0)
    let services: UnsafeMutablePointer<te_host_services>

    init() {
        services = UnsafeMutablePointer<te_host_services>.allocate(capacity: 1)
        services.initialize(to: te_host_services(struct_size: UInt32(MemoryLayout<te_host_services>.size), reserved: 0, host_context: nil,
                                                 log: nil, handshake_send: nil, now_ns: nil))
        // A services struct may be kept by the plugin until the process exits: never freed.
        let context = Unmanaged.passRetained(self).toOpaque()
        services.pointee.host_context = context
        services.pointee.log = { context, _, _ in CheckHost.from(context)?.called() }
        services.pointee.handshake_send = { context, _, _, reply in
            CheckHost.from(context)?.called()
            reply?.pointee.length = 0
            return TE_ERR_PEER_UNREACHABLE
        }
        services.pointee.now_ns = { context in
            CheckHost.from(context)?.called()
            return MonotonicClock.nanoseconds()
        }
    }

    private static func from(_ context: UnsafeMutableRawPointer?) -> CheckHost? {
        context.map { Unmanaged<CheckHost>.fromOpaque($0).takeUnretainedValue() }
    }

    private func called() {
        if destroyed.load(ordering: .acquiring) { callsAfterDestroy.add(1, ordering: .relaxed) }
    }
}

/// A plugin's vtable as the checks call it: each call with a fresh buffer, strings converted.
struct CheckedVtable: @unchecked Sendable {
    let d: te_plugin_descriptor

    /// A call that fills a te_buffer of `capacity`, and what it reported.
    func text(capacity: Int = 1 << 20, _ call: (UnsafeMutablePointer<te_buffer>) -> Int32) -> (status: Int32, text: String, length: Int) {
        var storage = [CChar](repeating: 0, count: max(capacity, 1))
        var reported = 0
        let status = storage.withUnsafeMutableBufferPointer { raw -> Int32 in
            var buffer = te_buffer(data: raw.baseAddress, capacity: capacity, length: 0)
            let status = call(&buffer)
            reported = buffer.length
            return status
        }
        let end = storage.firstIndex(of: 0) ?? storage.count
        return (status, String(decoding: storage[..<end].map { UInt8(bitPattern: $0) }, as: UTF8.self), reported)
    }

    func probe(_ options: String?) -> (status: Int32, reason: String, hint: String) {
        var hint = ""
        let reason = text { reasonBuffer in
            let inner = text { hintBuffer in
                if let options { return options.withCString { d.probe!($0, reasonBuffer, hintBuffer) } }
                return d.probe!(nil, reasonBuffer, hintBuffer)
            }
            hint = inner.text
            return inner.status
        }
        return (reason.status, reason.text, hint)
    }

    func create(_ options: String?, _ host: CheckHost) -> (Int32, OpaquePointer?) {
        var instance: OpaquePointer?
        let status: Int32
        if let options { status = options.withCString { d.create!($0, host.services, &instance) } } else { status = d.create!(nil, host.services, &instance) }
        return (status, instance)
    }

    func lastError(_ instance: OpaquePointer) -> String? { d.last_error!(instance).map { String(cString: $0) } }

    func openPeer(_ instance: OpaquePointer, _ descriptor: String) -> (Int32, UInt64) {
        var handle: UInt64 = 0
        let status = "checked-peer".withCString { name in descriptor.withCString { d.open_peer!(instance, name, $0, &handle) } }
        return (status, handle)
    }

    func submit(_ instance: OpaquePointer, _ requests: [te_request], stride: Int = MemoryLayout<te_request>.stride) -> (Int32, Int) {
        var accepted = -1
        let status = requests.withUnsafeBufferPointer { d.submit!(instance, $0.baseAddress, $0.count, stride, &accepted) }
        return (status, accepted)
    }
}
