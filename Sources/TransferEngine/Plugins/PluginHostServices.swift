import CTransportABI
import Logging

/// The services the host lends a plugin instance (`te_host_services`): logging into the
/// engine's logger, connection handshakes over the engine's handshake port, and the clock.
enum PluginHostServices {
    /// Host-side state the C callbacks reach through `host_context`.
    final class HostContext {
        let logger: Logger
        let handshake: @Sendable (String, String) throws -> String
        init(logger: Logger, handshake: @escaping @Sendable (String, String) throws -> String) {
            self.logger = logger
            self.handshake = handshake
        }
    }

    /// A services struct for one instance; it lives as long as the process (a plugin may keep it).
    static func make(logger: Logger, handshake: @escaping @Sendable (_ peerSegment: String, _ requestJSON: String) throws -> String)
        -> UnsafeMutablePointer<te_host_services> {
        let context = Unmanaged.passRetained(HostContext(logger: logger, handshake: handshake)).toOpaque()
        let services = UnsafeMutablePointer<te_host_services>.allocate(capacity: 1)
        services.initialize(to: te_host_services(
            struct_size: UInt32(MemoryLayout<te_host_services>.size), reserved: 0, host_context: context,
            log: { context, level, message in
                guard let context, let message else { return }
                let host = Unmanaged<HostContext>.fromOpaque(context).takeUnretainedValue()
                let text = String(cString: message)
                switch level {
                case TE_LOG_TRACE: host.logger.trace("\(text)")
                case TE_LOG_DEBUG: host.logger.debug("\(text)")
                case TE_LOG_INFO: host.logger.info("\(text)")
                case TE_LOG_WARNING: host.logger.warning("\(text)")
                default: host.logger.error("\(text)")
                }
            },
            handshake_send: { context, peer, request, reply in
                guard let context, let peer, let request, let reply else { return TE_ERR_INVALID_ARGUMENT }
                let host = Unmanaged<HostContext>.fromOpaque(context).takeUnretainedValue()
                do {
                    let answer = try host.handshake(String(cString: peer), String(cString: request))
                    return PluginHostServices.write(answer, into: reply)
                } catch {
                    host.logger.warning("plugin handshake to \(String(cString: peer)) failed: \(error)")
                    return TE_ERR_PEER_UNREACHABLE
                }
            },
            now_ns: { _ in MonotonicClock.nanoseconds() }))
        return services
    }

    /// Copies `text` into a te_buffer per the ABI's rules.
    static func write(_ text: String, into buffer: UnsafeMutablePointer<te_buffer>) -> Int32 {
        let bytes = Array(text.utf8)
        buffer.pointee.length = bytes.count
        guard let data = buffer.pointee.data, buffer.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
        bytes.withUnsafeBufferPointer { source in
            UnsafeMutableRawPointer(data).copyMemory(from: source.baseAddress!, byteCount: bytes.count)
        }
        data[bytes.count] = 0
        return TE_OK
    }
}
