import DequeModule
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CTransferEngineShims

/// The handshake (RPC) port: answers Metadata, Notify, Probe and Connection messages in the
/// official framing, one request per connection.
///
/// One I/O thread reads every connection's request without blocking (poll), each within a total
/// deadline; complete requests go to a few worker threads, since a handler may block (a plugin's
/// connection setup). Requests `inline` says are cheap (a probe; a small segment's descriptor) are
/// answered on the I/O thread, which saves a new peer a thread wake-up; a reply the socket does
/// not take at once is finished by a worker. An idle or trickling connection costs a table entry,
/// not a thread, so new peers are answered while hundreds of them are open. Limits: connections
/// being read in all and per source address (past either, the oldest such connection is closed to
/// admit the new one), bytes buffered, requests queued for the workers.
final class HandshakeServer: @unchecked Sendable {
    /// Called for each refused or malformed message (the handshake-failure metric).
    let onBadMessage: (@Sendable () -> Void)?
    typealias Handler = @Sendable (HandshakeWire.Message) -> String?

    /// Bounds on what peers can hold (MC_HANDSHAKE_* settings).
    struct Limits: Sendable {
        /// A request must arrive whole within this (MC_HANDSHAKE_FRAME_TIMEOUT_MS).
        var frameDeadlineMs = 10_000
        /// Connections being read at once (MC_HANDSHAKE_MAX_CONNECTIONS).
        var maxConnections = 1024
        /// Of those, from one address (MC_HANDSHAKE_MAX_PER_ADDRESS).
        var maxPerAddress = 64
        /// Request bytes buffered over all connections; past it the connection holding the most goes.
        var maxBufferedBytes = 64 << 20
        /// Of those, from one address.
        var maxBufferedPerAddress = 8 << 20
        /// A reply must be sent whole within this.
        var replyDeadlineMs = 5000
        /// Complete requests (and rests of replies begun on the I/O thread) waiting for a worker.
        var maxQueued = 64
    }

    /// Threads that run handlers and send replies.
    static let workers = 4

    /// The bound port.
    let port: UInt16

    private let listener: Socket
    let handler: Handler
    let logger: Logger
    private let maxLength: Int
    let limits: Limits
    private let auth: PeerAuthenticator?
    /// What the I/O thread answers itself.
    let inline: Inline?
    /// The I/O thread's receive buffer (one, not 64 KiB zeroed for every readable connection).
    private let chunk: UnsafeMutableRawBufferPointer
    /// A pipe that wakes the I/O thread from poll (stop, replied connections handed back).
    private let wakeRead: Int32
    private let wakeWrite: Int32
    let shared = ConditionLock(Shared())

    /// State the I/O thread and the workers share.
    struct Shared {
        var stopped = false
        var queue: Deque<Job> = []
        /// Replied connections handed back to the I/O thread to wait for the client's close.
        var lingering: [Socket] = []
        var limitWarnings = WarningThrottle()
        /// Workers still running (stop waits for them).
        var workers = 0
        /// The I/O thread is inside the handler (stop waits for that too).
        var answeringInline = false
        /// The I/O thread (a stop called from inside its answer must not wait for itself).
        var ioThread: pthread_t? = nil
        /// The workers' threads (a stop called from inside a worker's handler must not wait for that worker).
        var workerThreads: [pthread_t] = []
    }

    /// A connection whose request is being read (I/O thread only).
    private final class Reading {
        let socket: Socket
        let peer: String
        let address: String
        let deadline: UInt64
        var header: [UInt8] = []
        var body: [UInt8] = []
        var expected: Int?
        /// Set when the connection was cut short to make room; the I/O loop drops it.
        var discarded = false
        /// With authentication on: the challenge sent, until the peer's response checked out.
        var challenge: [UInt8]?
        var response: [UInt8] = []
        /// Request bytes held.
        var held: Int { header.count + body.count + response.count }
        /// Frees the bytes and closes the connection (the loop removes it from its table).
        func discard() {
            discarded = true
            header = []
            body = []
            socket.close()
        }
        init(socket: Socket, peer: SocketAddress, deadline: UInt64) {
            self.socket = socket
            self.peer = peer.description
            self.address = peer.host
            self.deadline = deadline
        }
    }

    /// With `auth`, every connection must pass the shared-secret exchange before its request is read.
    /// `inline`: what the I/O thread answers itself (nil: workers answer everything).
    init(listener: Socket, maxLength: Int, limits: Limits = Limits(), auth: PeerAuthenticator? = nil, logger: Logger,
         inline: Inline? = nil, onBadMessage: (@Sendable () -> Void)? = nil, handler: @escaping Handler) throws {
        self.listener = listener
        self.onBadMessage = onBadMessage
        self.auth = auth
        self.inline = inline
        self.handler = handler
        self.logger = logger
        self.maxLength = maxLength
        self.limits = limits
        self.port = listener.localAddress.port
        _ = fcntl(listener.fd, F_SETFL, fcntl(listener.fd, F_GETFL) | O_NONBLOCK)
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw SocketError.system(call: "pipe", errno: .init(rawValue: errno)) }
        for fd in pipeFDs {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        (wakeRead, wakeWrite) = (pipeFDs[0], pipeFDs[1])
        // Allocated once every property is set: deinit frees it if starting a thread throws.
        chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
        try OSThread.spawn(name: "te-handshake-io") { [self] in ioLoop() }
        shared.withLock { $0.workers = Self.workers }
        for started in 0..<Self.workers {
            do {
                try OSThread.spawn(name: "te-handshake") { [self] in
                    workerLoop()
                    shared.withLock(notify: true) { $0.workers -= 1 }
                }
            } catch {
                // The threads already running hold this server: stop them, or they would keep the
                // port and never let it go.
                shared.withLock { $0.workers -= Self.workers - started }
                stop(waitMs: 1000)
                throw error
            }
        }
    }

    deinit {
        // Here, not when the I/O thread ends: a worker may still wake it after that.
        Glibc.close(wakeRead)
        Glibc.close(wakeWrite)
        chunk.deallocate()
    }

    /// Stops reading and answering, and waits (at most `waitMs`) for handlers still running, so
    /// none is inside a plugin the engine shuts down next; connections still open are closed.
    func stop(waitMs: Int = 5000) {
        let (already, queued) = shared.withLock(notify: true) { state -> (Bool, [Socket]) in
            defer { state.stopped = true; state.queue.removeAll() }
            return (state.stopped, state.queue.map(\.socket))
        }
        if already { return }
        // Refuses new connections now; the I/O thread closes the listener when it next wakes.
        listener.shutdownBoth()
        wake()
        queued.forEach { $0.close() }
        let deadline = MonotonicClock.nanoseconds() + UInt64(waitMs) * 1_000_000
        // Called from a handler (the engine released there): not waiting for the thread running it.
        let me = pthread_self()
        let (onIOThread, onWorker) = shared.withLock { state -> (Bool, Bool) in
            let io = state.ioThread.map { pthread_equal($0, me) != 0 } ?? false
            return (io, state.workerThreads.contains { pthread_equal($0, me) != 0 })
        }
        let othersLeft = onWorker ? 1 : 0
        if shared.wait(deadline: deadline, until: { $0.workers <= othersLeft && (onIOThread || !$0.answeringInline) ? true : nil }) == nil {
            logger.warning("handshake: answers still running \(waitMs) ms after stop")
        }
    }

    func wake() {
        var one: UInt8 = 1
        _ = Glibc.write(wakeWrite, &one, 1)
    }

    // MARK: - I/O thread

    private func ioLoop() {
        shared.withLock { $0.ioThread = pthread_self() }
        var reading: [Reading] = []
        var lingering: [(socket: Socket, deadline: UInt64)] = []
        // What a first peer's connection makes (storage of these types, an address's text), made
        // now: the runtime builds a type's metadata on its first use, which a new peer would wait for.
        reading.reserveCapacity(16)
        lingering.reserveCapacity(16)
        _ = Reading(socket: listener, peer: listener.localAddress, deadline: 0).address
        var buffered = 0
        defer {
            reading.forEach { $0.socket.close() }
            lingering.forEach { $0.socket.close() }
            listener.close()
        }
        func drop(_ index: Int) {
            buffered -= reading[index].held
            reading[index].socket.close()
            reading.remove(at: index)
        }
        while true {
            let (stopped, handedBack) = shared.withLock { state -> (Bool, [Socket]) in
                defer { state.lingering.removeAll() }
                return (state.stopped, state.lingering)
            }
            if stopped { return }
            let now = MonotonicClock.nanoseconds()
            lingering += handedBack.map { ($0, now + 1_000_000_000) }
            // Deadlines: a request not whole in time, a client that never closes after its reply.
            for index in reading.indices.reversed() where reading[index].deadline <= now {
                logger.debug("handshake: \(reading[index].peer) did not send a whole request within \(limits.frameDeadlineMs) ms")
                drop(index)
            }
            lingering.removeAll { entry in
                if entry.deadline <= now { entry.socket.close(); return true }
                return false
            }
            var fds = [pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0), pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)]
            fds += reading.map { pollfd(fd: $0.socket.fd, events: Int16(POLLIN), revents: 0) }
            fds += lingering.map { pollfd(fd: $0.socket.fd, events: Int16(POLLIN), revents: 0) }
            let nearest = (reading.map(\.deadline) + lingering.map(\.deadline)).min().map { $0 > now ? $0 - now : 0 } ?? 1_000_000_000
            let timeoutMs = Int32(min(1000, nearest / 1_000_000 + 1))
            let ready = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, nfds_t($0.count), timeoutMs) }
            if ready < 0 { if errno == EINTR { continue }; logger.error("handshake: poll failed (errno \(errno))"); return }
            if fds[0].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while drain.withUnsafeMutableBytes({ Glibc.read(wakeRead, $0.baseAddress, 64) }) > 0 {}
            }
            // Lingering connections: any input or hang-up means the client is done.
            let lingerBase = 2 + reading.count
            for index in lingering.indices.reversed() where fds[lingerBase + index].revents != 0 {
                lingering[index].socket.close()
                lingering.remove(at: index)
            }
            // Reading connections (indices match the poll array until something is removed).
            var finished: [Int] = []
            for index in reading.indices where fds[2 + index].revents != 0 && !reading[index].discarded {
                switch receive(reading[index], buffered: &buffered, reading: reading) {
                case .more: break
                case .complete, .failed: finished.append(index)
                }
            }
            for index in finished.reversed() where !reading[index].discarded {
                let connection = reading[index]
                if connection.expected != nil, connection.body.count == connection.expected {
                    buffered -= connection.held
                    reading.remove(at: index)
                    if !answerInline(connection.socket, body: connection.body, peer: connection.peer) {
                        enqueue(.request(connection.socket, body: connection.body, peer: connection.peer))
                    }
                } else {
                    drop(index)
                }
            }
            reading.removeAll { $0.discarded }  // cut short to make room; bytes already given back
            if fds[1].revents != 0 { acceptAll(into: &reading, buffered: &buffered) }
        }
    }

    private enum ReadOutcome { case more, complete, failed }

    /// Reads what has arrived for one connection, without blocking. Past the byte budgets the
    /// connection fails; past the total one the connection holding the most bytes is cut short
    /// first (`evictLargest`), so one address cannot keep everyone else's requests out.
    private func receive(_ connection: Reading, buffered: inout Int, reading: [Reading]) -> ReadOutcome {
        while true {
            let want: Int
            if connection.challenge != nil {
                want = PeerAuthenticator.responseSize - connection.response.count
            } else if let expected = connection.expected { want = min(chunk.count, expected - connection.body.count) } else { want = 8 - connection.header.count }
            if want == 0 { return .complete }
            let n = Glibc.recv(connection.socket.fd, chunk.baseAddress, want, Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK { return .more }
                if errno == EINTR { continue }
                return .failed
            }
            if n == 0 { return .failed }  // closed before a whole request
            let fromAddress = reading.reduce(0) { $0 + ($1.address == connection.address ? $1.held : 0) }
            guard fromAddress + n <= limits.maxBufferedPerAddress else {
                warnLimit("handshake: \(limits.maxBufferedPerAddress) bytes of requests from \(connection.address) already buffered; closing \(connection.peer)")
                return .failed
            }
            if buffered + n > limits.maxBufferedBytes, let largest = reading.max(by: { $0.held < $1.held }), largest !== connection,
               largest.held > connection.held {
                warnLimit("handshake: \(limits.maxBufferedBytes) bytes of requests buffered; closing \(largest.peer), which holds the most")
                buffered -= largest.held
                largest.discard()
            }
            guard buffered + n <= limits.maxBufferedBytes else {
                warnLimit("handshake: \(limits.maxBufferedBytes) bytes of requests already buffered; closing \(connection.peer)")
                return .failed
            }
            buffered += n
            if let challenge = connection.challenge, let auth {
                connection.response += chunk[0..<n]
                guard connection.response.count == PeerAuthenticator.responseSize else { continue }
                buffered -= connection.response.count
                guard let proof = auth.verify(response: connection.response, to: challenge, channel: .handshake),
                      proof.withUnsafeBytes({ Glibc.send(connection.socket.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }) == proof.count else {
                    warnLimit("handshake: \(connection.peer) failed authentication; connection closed")
                    connection.response = []
                    return .failed
                }
                connection.challenge = nil
                connection.response = []
            } else if connection.expected == nil {
                connection.header += chunk[0..<n]
                if connection.header.count == 8 {
                    let length = connection.header.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
                    do {
                        connection.expected = try HandshakeWire.checkLength(length, limit: maxLength)
                        connection.body.reserveCapacity(min(connection.expected!, 64 << 10))
                    } catch {
                        onBadMessage?()
                        logger.warning("handshake: bad message from \(connection.peer): \(error)", metadata: ["peer": "\(connection.peer)"])
                        return .failed
                    }
                }
            } else {
                connection.body += chunk[0..<n]
            }
        }
    }

    /// Accepts every pending connection, making room within the limits by closing the oldest
    /// connection being read (from the same address first).
    private func acceptAll(into reading: inout [Reading], buffered: inout Int) {
        // Bounded per pass, so a connect flood cannot keep the thread from reading and from deadlines.
        for _ in 0..<64 {
            let fd = te_accept_cloexec(listener.fd)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if errno == EMFILE || errno == ENFILE {
                    // The listener stays readable: free a descriptor (the oldest connection being
                    // read) instead of spinning on it.
                    warnLimit("handshake: out of file descriptors; closing the oldest connection being read")
                    if !reading.isEmpty {
                        buffered -= reading[0].held
                        reading[0].socket.close()
                        reading.removeFirst()
                    } else {
                        usleep(10_000)
                    }
                }
                return
            }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            let socket = Socket(descriptor: .init(rawValue: fd))
            let connection = Reading(socket: socket, peer: socket.peerAddress,
                                     deadline: MonotonicClock.nanoseconds() + UInt64(limits.frameDeadlineMs) * 1_000_000)
            if let auth {
                // The server speaks first; 36 bytes fit any fresh socket's send buffer.
                let challenge = auth.challenge()
                guard challenge.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }) == challenge.count else {
                    socket.close()
                    continue
                }
                connection.challenge = challenge
            }
            if let oldest = reading.firstIndex(where: { $0.address == connection.address }),
               reading.lazy.filter({ $0.address == connection.address }).count >= limits.maxPerAddress {
                warnLimit("handshake: \(limits.maxPerAddress) connections from \(connection.address) are being read; closing its oldest")
                buffered -= reading[oldest].held
                reading[oldest].socket.close()
                reading.remove(at: oldest)
            } else if reading.count >= limits.maxConnections {
                warnLimit("handshake: \(limits.maxConnections) connections are being read; closing the oldest")
                buffered -= reading[0].held
                reading[0].socket.close()
                reading.removeFirst()
            }
            reading.append(connection)
        }
    }
}
