import Logging
import Synchronization

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
/// ADDR_REJECTED status (v2) and the connection ends, as upstream's does: its write
/// side is shut and input drained first, so the answers before it still arrive.
final class TCPDataServer: @unchecked Sendable {
    private let registry: MemoryRegistry
    private let logger: Logger
    private let payloadTimeoutMs: Int
    private let idleTimeoutNs: UInt64
    private let auth: PeerAuthenticator?
    private let spinNanoseconds: UInt64
    /// At most one connection thread spins at a time, so busy-waiting never
    /// competes with threads that are moving data (this host may have 2 cores).
    private let spinning = Atomic<Bool>(false)
    /// Set in init, used by `stop` (connection threads read `stopping`, never this).
    private var acceptor: ConnectionAcceptor!
    /// Set by `stop`: a connection ending then is no news.
    private let stopping = Atomic<Bool>(false)

    /// The bound port.
    let port: UInt16
    /// Counts the bytes peers read and wrote here (nil: metrics off).
    private let servedBytes: ServedBytes?

    /// Binds the listener (see `PortAllocator` for the port choice) and starts accepting.
    /// `idleTimeoutMs`: a connection with no request for this long is closed (MC_TCP_IDLE_TIMEOUT_SEC);
    /// `maxPerAddress`: connections served at once for one peer address (MC_TCP_MAX_CONNECTIONS_PER_ADDRESS).
    init(listener: Socket, registry: MemoryRegistry, logger: Logger, payloadTimeoutMs: Int, spinNanoseconds: UInt64,
         idleTimeoutMs: Int = 300_000, maxPerAddress: Int = 256, auth: PeerAuthenticator? = nil, served: ServedBytes? = nil) throws {
        self.auth = auth
        self.servedBytes = served
        self.spinNanoseconds = spinNanoseconds
        self.registry = registry
        self.logger = logger
        self.payloadTimeoutMs = payloadTimeoutMs
        self.idleTimeoutNs = UInt64(idleTimeoutMs) * 1_000_000
        self.port = listener.localAddress.port
        acceptor = try ConnectionAcceptor(listener: listener, limit: Self.maxConnections, perAddressLimit: maxPerAddress,
                                          name: "tcp data", logger: logger,
                                          refuse: { _ in }, serve: { [weak self] connection in self?.serve(connection) })
    }

    /// Stops accepting and closes every connection; false when a connection thread was still
    /// running at `waitMs` (see `ConnectionAcceptor.stop`).
    @discardableResult
    func stop(waitMs: Int = 5000) -> Bool {
        stopping.store(true, ordering: .relaxed)
        return acceptor.stop(waitMs: waitMs)
    }

    /// Most data connections served at once (each has a thread).
    static let maxConnections = 1024

    /// The per-connection request loop.
    ///
    /// Acknowledgements of pipelined writes are coalesced: while the next request
    /// is already waiting in the socket, OK frames queue up and go out in one send
    /// (before any read response, a rejection, or blocking for more input), so the
    /// client sees them in request order either way.
    private func serve(_ connection: Socket) {
        let peer = connection.peerAddress.description
        // Timeouts bound every payload transfer; an idle wait between requests is not an error
        // until the idle timeout. Keepalive finds peers that vanished without closing.
        connection.setTimeouts(receiveMs: min(payloadTimeoutMs, Int(idleTimeoutNs / 1_000_000)), sendMs: payloadTimeoutMs)
        connection.setKeepAlive(userTimeoutMs: UInt32(payloadTimeoutMs))
        SameHostBuffers.apply(to: connection, side: .server)
        if let auth, !auth.authenticateAsServer(connection, channel: .data, deadline: MonotonicClock.nanoseconds() + 5_000_000_000) {
            logger.warning("tcp data: \(peer) failed authentication; connection closed", metadata: ["peer": "\(peer)"])
            return
        }
        let headerBytes = UnsafeMutableRawBufferPointer.allocate(byteCount: TCPWire.headerSize, alignment: 8)
        defer { headerBytes.deallocate() }
        // Bytes of the next header that arrived together with the previous write's payload.
        var carried = 0
        var pendingAcks: [UInt64] = []
        // A connection whose requests follow each other closely is "hot": its thread
        // spins briefly for the next header instead of sleeping, which saves a wake-up
        // (about a third of a small request's round trip on loopback).
        var hot = spinNanoseconds > 0
        var lastDone = MonotonicClock.nanoseconds()
        // Whether this connection's thread spins for the next request (measured: the gap from
        // the previous answer to the next request, spinning or blocked).
        var policy = WaitPolicy()
        var spun = false
        func flushAcks() throws {
            guard !pendingAcks.isEmpty else { return }
            try pendingAcks.withUnsafeBytes { try connection.sendAll([$0]) }
            pendingAcks.removeAll(keepingCapacity: true)
        }
        while true {
            do {
                if carried == 0 {
                    if !pendingAcks.isEmpty, !connection.hasPendingInput { try flushAcks() }
                    let spins = hot && policy.spins
                    spun = false
                    if spins, spinning.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
                        hot = connection.spinUntilReadable(nanoseconds: spinNanoseconds)
                        spinning.store(false, ordering: .releasing)
                        spun = true
                    }
                    var first = 0
                    while true {
                        do {
                            first = try connection.receiveSome(headerBytes.baseAddress!, count: TCPWire.headerSize)
                            break
                        } catch SocketError.timedOut("receive") {
                            // Idle between requests: fine until the idle timeout.
                            if MonotonicClock.nanoseconds() - lastDone >= idleTimeoutNs {
                                logger.debug("tcp data: closing \(peer) after \(idleTimeoutNs / 1_000_000_000) s without a request")
                                try? flushAcks()
                                return
                            }
                            continue
                        }
                    }
                    if first == 0 { return }  // clean EOF between requests
                    carried = first
                    // Every gap counts, whichever way it was waited (the client's own pauses fall on
                    // both ways alike; the policy caps a long one). A wait that could not go the
                    // policy's way (not hot, or another connection was spinning) is left out by it.
                    policy.record(MonotonicClock.nanoseconds() - lastDone, spun: spun)
                    if !hot, spinNanoseconds > 0, MonotonicClock.nanoseconds() - lastDone < spinNanoseconds { hot = true }
                }
                if carried < TCPWire.headerSize {
                    try connection.receiveAll(headerBytes.baseAddress! + carried, count: TCPWire.headerSize - carried)
                }
                carried = 0
                defer { lastDone = MonotonicClock.nanoseconds() }
                guard let header = TCPWire.Header.decode(UnsafeRawBufferPointer(headerBytes)) else {
                    // An opcode no engine sends: refused (v2 framing gets a rejection status),
                    // then the connection closes; one line per connection.
                    let opcode = TCPWire.Header.opcode(UnsafeRawBufferPointer(headerBytes))
                    logger.warning("tcp data: refused unknown opcode 0x\(String(opcode, radix: 16)) from \(peer); closing the connection", metadata: ["peer": "\(peer)"])
                    if opcode & TCPWire.v2Flag != 0 { pendingAcks.append(TCPWire.statusFrame(.addressRejected)) }
                    try? flushAcks()
                    endAfterRefusal(connection)
                    return
                }
                if header.operation == .read, header.acknowledged, try serveReadGroup(first: header, on: connection, flushAcks: flushAcks) {
                    continue
                }
                let served: Bool? = try registry.withRegistered(address: header.address, length: header.size, holder: connection) {
                    let memory = UnsafeMutableRawPointer(bitPattern: UInt(header.address))!
                    let count = Int(header.size)
                    switch header.operation {
                    case .write:
                        if count <= Self.smallWrite {
                            carried = try receiveSmallPayload(into: memory, count: count, nextHeader: headerBytes, on: connection,
                                                              deadline: payloadDeadline(count))
                        } else {
                            try connection.receiveAll(memory, count: count, deadline: payloadDeadline(count))
                        }
                        if header.acknowledged {
                            pendingAcks.append(TCPWire.statusFrame(.ok))
                            // A peer that streams small writes without reading its acknowledgements
                            // must not grow them without bound: send them at the limit.
                            if pendingAcks.count >= Self.maxPendingAcks { try flushAcks() }
                        }
                    case .read:  // v1 read (v2 reads are served in groups above)
                        try flushAcks()
                        try connection.sendAll(memory, count: count)
                    }
                    servedBytes?.add(header.operation, header.size)
                    return true
                }
                if served == nil {
                    logger.warning("tcp data: rejected \(header.operation) of \(header.size) bytes at 0x\(String(header.address, radix: 16)) from \(peer): not inside one registered buffer", metadata: ["peer": "\(peer)"])
                    if header.acknowledged {
                        pendingAcks.append(TCPWire.statusFrame(.addressRejected))
                    }
                    try? flushAcks()
                    endAfterRefusal(connection)
                    return
                }
            } catch {
                if !stopping.load(ordering: .relaxed) {
                    logger.debug("tcp data: connection from \(peer) ended: \(error)")
                }
                return
            }
        }
    }

    /// Ends a connection after refusing a request. The peer may have sent more requests already;
    /// closing with their bytes unread would reset the connection, and a reset drops what is still
    /// queued here for the peer: the answers to the requests before the refused one, and the
    /// refusal itself. So the write side is shut (the peer reads all of it, then the end of the
    /// stream) and input is dropped until the peer closes, for at most 2 s and 64 MiB.
    private func endAfterRefusal(_ connection: Socket) {
        connection.shutdownWrite()
        connection.setTimeouts(receiveMs: 100, sendMs: payloadTimeoutMs)
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: 16)
        defer { scratch.deallocate() }
        var dropped = 0
        while dropped < 64 << 20, MonotonicClock.nanoseconds() < deadline {
            do {
                let n = try connection.receiveSome(scratch, count: 64 << 10)
                if n == 0 { return }
                dropped += n
            } catch SocketError.timedOut {
                continue
            } catch {
                return
            }
        }
    }

    /// The latest time a write payload may finish arriving: the status timeout plus
    /// 20 ms per MiB. The registration stays read-locked meanwhile, so a peer that
    /// trickles bytes must not hold it (and any unregistration) indefinitely.
    private func payloadDeadline(_ count: Int) -> UInt64 {
        MonotonicClock.nanoseconds() + UInt64(payloadTimeoutMs) * 1_000_000 + UInt64(count >> 20) * 20_000_000
    }

    /// Writes up to this size read their payload and the start of the next header in one call.
    private static let smallWrite = 256 << 10

    /// Acknowledgements held back while more requests are queued (8 KiB of frames) before they are
    /// sent anyway.
    static let maxPendingAcks = 1024

    /// Receives a write's payload straight into `memory`, letting the same system call
    /// also take whatever part of the next request header already arrived (pipelined
    /// requests then cost one call each). Returns how many header bytes were taken.
    private func receiveSmallPayload(into memory: UnsafeMutableRawPointer, count: Int,
                                     nextHeader: UnsafeMutableRawBufferPointer, on connection: Socket, deadline: UInt64) throws -> Int {
        var received = 0
        while true {
            if received > 0, MonotonicClock.nanoseconds() > deadline { throw SocketError.timedOut("receive") }
            let n = try connection.receiveSome([UnsafeMutableRawBufferPointer(start: memory + received, count: count - received), nextHeader])
            if n == 0 { throw SocketError.closedByPeer(expected: count, received: received) }
            if received + n >= count { return received + n - count }
            received += n
        }
    }

    /// Most read headers a group answers with one gathered send.
    private static let maxReadGroup = 64

    /// Answers `first` together with the acknowledged READ requests already queued
    /// behind it (seen with MSG_PEEK, consumed only once validated), in one gathered
    /// send. Returns false, consuming nothing, when `first` itself is not registered.
    private func serveReadGroup(first: TCPWire.Header, on connection: Socket, flushAcks: () throws -> Void) throws -> Bool {
        var queued = [UInt8](repeating: 0, count: (Self.maxReadGroup - 1) * TCPWire.headerSize)
        let peeked = queued.withUnsafeMutableBytes { connection.peekAvailable($0.baseAddress!, count: $0.count) }
        var group = [first]
        var offset = 0
        while offset + TCPWire.headerSize <= peeked {
            let next = queued.withUnsafeBytes { TCPWire.Header.decode(UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + TCPWire.headerSize)])) }
            guard let next, next.operation == .read, next.acknowledged else { break }
            group.append(next)
            offset += TCPWire.headerSize
        }
        return try registry.withStableRegistrations(holder: connection) { isRegistered in
            guard isRegistered(first.address, first.size) else { return false }
            // Stop before the first unregistered range: it is consumed and rejected on its own.
            let valid = group.prefix { isRegistered($0.address, $0.size) }
            if valid.count > 1 {
                try queued.withUnsafeMutableBytes { try connection.receiveAll($0.baseAddress!, count: (valid.count - 1) * TCPWire.headerSize) }
            }
            try flushAcks()
            var frames = [UInt64](repeating: TCPWire.statusFrame(.ok), count: valid.count)
            try frames.withUnsafeMutableBytes { raw in
                var parts: [UnsafeRawBufferPointer] = []
                parts.reserveCapacity(valid.count * 2)
                for (i, header) in valid.enumerated() {
                    parts.append(UnsafeRawBufferPointer(rebasing: raw[(i * 8)..<(i * 8 + 8)]))
                    parts.append(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(header.address)), count: Int(header.size)))
                }
                try connection.sendAll(parts)
            }
            if let servedBytes { for header in valid { servedBytes.add(.read, header.size) } }
            return true
        }
    }
}
