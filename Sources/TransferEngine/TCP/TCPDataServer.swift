import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The server side of the TCP data port: executes peers' READ/WRITE requests
/// against locally registered memory.
///
/// One thread per connection runs the request loop: read a 24-byte header,
/// check the range against the registry, then move the payload directly
/// between the socket and the registered memory. A rejected request gets an
/// ADDR_REJECTED status (v2) and the connection is closed, as upstream does.
final class TCPDataServer: @unchecked Sendable {
    private let registry: MemoryRegistry
    private let logger: Logger
    private let payloadTimeoutMs: Int
    private let listener: Socket
    private let connections = ConditionLock<[Int32: Socket]>([:])
    private let stopped = ConditionLock(false)

    /// The bound port.
    let port: UInt16

    /// Binds the listener (see `PortAllocator` for the port choice) and starts accepting.
    init(listener: Socket, registry: MemoryRegistry, logger: Logger, payloadTimeoutMs: Int) throws {
        self.listener = listener
        self.registry = registry
        self.logger = logger
        self.payloadTimeoutMs = payloadTimeoutMs
        self.port = listener.localAddress.port
        try OSThread.spawn(name: "te-tcp-accept") { [self] in acceptLoop() }
    }

    /// Stops accepting and closes every connection.
    func stop() {
        let already = stopped.withLock { state -> Bool in defer { state = true }; return state }
        if already { return }
        listener.shutdownBoth()
        listener.close()
        connections.withLock { $0.values.forEach { $0.shutdownBoth() } }
    }

    private func acceptLoop() {
        while true {
            let accepted: Socket?
            do { accepted = try listener.accept() } catch {
                logger.error("tcp data listener failed: \(error)")
                return
            }
            guard let connection = accepted else { return }
            if stopped.withLock({ $0 }) { connection.close(); return }
            connection.setTimeouts(receiveMs: 0, sendMs: payloadTimeoutMs)
            connections.withLock { $0[connection.fd] = connection }
            do {
                try OSThread.spawn(name: "te-tcp-serve") { [self] in
                    serve(connection)
                    connections.withLock { _ = $0.removeValue(forKey: connection.fd) }
                    connection.close()
                }
            } catch {
                logger.error("cannot start a thread for a tcp data connection: \(error)")
                connections.withLock { _ = $0.removeValue(forKey: connection.fd) }
                connection.close()
            }
        }
    }

    /// The per-connection request loop.
    private func serve(_ connection: Socket) {
        let peer = connection.peerAddress.description
        var headerBytes = [UInt8](repeating: 0, count: TCPWire.headerSize)
        while true {
            do {
                let received = try headerBytes.withUnsafeMutableBytes { buffer -> Int in
                    // A clean EOF between requests is normal (the client closed its connection).
                    let first = try connection.receiveSome(buffer.baseAddress!, count: TCPWire.headerSize)
                    if first == 0 { return 0 }
                    if first < TCPWire.headerSize {
                        try connection.receiveAll(buffer.baseAddress! + first, count: TCPWire.headerSize - first)
                    }
                    return TCPWire.headerSize
                }
                if received == 0 { return }
                let header = headerBytes.withUnsafeBytes { TCPWire.Header.decode($0) }
                let served: Bool? = try registry.withRegistered(address: header.address, length: header.size) {
                    try execute(header, on: connection)
                    return true
                }
                if served == nil {
                    logger.warning("tcp data: rejected \(header.operation) of \(header.size) bytes at 0x\(String(header.address, radix: 16)) from \(peer): not inside one registered buffer")
                    if header.acknowledged {
                        var frame = TCPWire.statusFrame(.addressRejected)
                        try? connection.sendAll(&frame, count: TCPWire.statusFrameSize)
                    }
                    connection.shutdownWrite()
                    return
                }
            } catch {
                if !stopped.withLock({ $0 }) {
                    logger.debug("tcp data: connection from \(peer) ended: \(error)")
                }
                return
            }
        }
    }

    private func execute(_ header: TCPWire.Header, on connection: Socket) throws {
        let memory = UnsafeMutableRawPointer(bitPattern: UInt(header.address))!
        let count = Int(header.size)
        switch header.operation {
        case .write:
            // Bound the payload wait so a stalled client cannot pin the registration.
            connection.setTimeouts(receiveMs: payloadTimeoutMs, sendMs: payloadTimeoutMs)
            defer { connection.setTimeouts(receiveMs: 0, sendMs: payloadTimeoutMs) }
            try connection.receiveAll(memory, count: count)
            if header.acknowledged {
                var frame = TCPWire.statusFrame(.ok)
                try connection.sendAll(&frame, count: TCPWire.statusFrameSize)
            }
        case .read:
            if header.acknowledged {
                var frame = TCPWire.statusFrame(.ok)
                try withUnsafeBytes(of: &frame) { status in
                    try connection.sendAll([status, UnsafeRawBufferPointer(start: memory, count: count)])
                }
            } else {
                try connection.sendAll(memory, count: count)
            }
        }
    }
}
