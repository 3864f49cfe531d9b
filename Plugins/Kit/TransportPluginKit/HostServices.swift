import CTransportABI

/// The services the host lends an instance (`te_host_services`), read only as far as its
/// `struct_size` says.
public struct HostServices: @unchecked Sendable {
    private let services: UnsafePointer<te_host_services>?

    /// Wraps the pointer `create` received (nil: no services; logs are dropped).
    public init(_ services: UnsafePointer<te_host_services>?) {
        let complete = MemoryLayout<te_host_services>.size
        self.services = services.flatMap { Int($0.pointee.struct_size) >= complete ? $0 : nil }
    }

    /// Writes one line through the host's logger.
    public func log(_ level: Int32, _ text: String) {
        guard let services, let log = services.pointee.log else { return }
        text.withCString { log(services.pointee.host_context, level, $0) }
    }

    /// Sends `request` to `peer`'s handshake port through the host and returns the answer. A
    /// longer answer than `capacity` is fetched again at its size, up to `limit` bytes (so the
    /// request must be safe to repeat).
    public func handshake(peer: String, request: String, capacity: Int = 4096, limit: Int = 64 << 20) throws(PluginFailure) -> String {
        guard let services, let send = services.pointee.handshake_send else {
            throw .notSupported("the host offers no handshake channel")
        }
        var size = max(capacity, 64)
        for _ in 0..<2 {
            let storage = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { storage.deallocate() }
            storage[0] = 0
            var reply = te_buffer(data: storage, capacity: size, length: 0)
            let status = peer.withCString { name in request.withCString { send(services.pointee.host_context, name, $0, &reply) } }
            if status == TE_ERR_BUFFER_TOO_SMALL, reply.length < limit, reply.length >= size {
                size = reply.length + 1
                continue
            }
            guard status == TE_OK else { throw PluginFailure(status, "handshake with \(peer) failed (\(PluginFailure.name(of: status)))") }
            storage[size - 1] = 0
            return String(cString: storage)
        }
        throw PluginFailure(TE_ERR_IO, "the handshake answer from \(peer) is larger than \(limit) bytes")
    }
}
