import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The worker threads: each answers one handshake (or finishes one reply) at a time, then leaves
// the connection to the I/O thread until the client closes it. Cheap kinds are answered on the
// I/O thread itself (`answerInline`).

extension HandshakeServer {
    /// Requests the I/O thread may answer without a worker: of `kinds` (read from the type byte,
    /// so other bodies are not decoded there), when `answer` gives a reply. `answer` must not
    /// block; nil hands the request to a worker and the full handler.
    struct Inline: Sendable {
        let kinds: Set<HandshakeWire.Kind>
        let answer: @Sendable (HandshakeWire.Message) -> String?
    }

    /// A worker's task: a request to answer, or the rest of a reply the I/O thread began, to be
    /// sent whole by `deadline` (monotonic ns).
    enum Job {
        case request(Socket, body: [UInt8], peer: String)
        case replyRest(Socket, rest: [UInt8], peer: String, deadline: UInt64)

        var socket: Socket {
            switch self { case .request(let socket, _, _), .replyRest(let socket, _, _, _): return socket }
        }
        var peer: String {
            switch self { case .request(_, _, let peer), .replyRest(_, _, let peer, _): return peer }
        }
    }

    func workerLoop() {
        shared.withLock { $0.workerThreads.append(pthread_self()) }
        while true {
            let next = shared.wait(until: { state -> Job?? in
                if state.stopped { return .some(nil) }
                return state.queue.popFirst().map { .some($0) }
            })
            guard let job = next ?? nil else { return }
            switch job {
            case .request(let socket, let body, let peer): answer(socket, body: body, peer: peer)
            case .replyRest(let socket, let rest, let peer, let deadline): finishReply(socket, rest: rest, peer: peer, deadline: deadline)
            }
        }
    }

    /// On the I/O thread: answers a request `inline` takes, sending what the socket takes without
    /// blocking and leaving the rest to a worker. False: for the workers (another kind, a body
    /// that does not decode, or no cheap answer now).
    func answerInline(_ connection: Socket, body: [UInt8], peer: String) -> Bool {
        // Small bodies only (a probe's or fetch's is a few hundred bytes): a large one is decoded by a worker.
        guard let inline, body.count <= 4096, let kind = body.first.flatMap({ HandshakeWire.Kind(rawValue: $0) }), inline.kinds.contains(kind),
              let request = try? HandshakeWire.decodeBody(body), request.kind == kind, !request.legacy else { return false }
        // Not once stop began: it waits for a handler running here, as for the workers'.
        guard shared.withLock({ state -> Bool in
            if state.stopped { return false }
            state.answeringInline = true
            return true
        }) else {
            connection.close()
            return true
        }
        let answer = inline.answer(request)
        if shared.withLock({ state -> Bool in state.answeringInline = false; return state.stopped }) { shared.notifyAll() }
        guard let replyJSON = answer else { return false }
        let reply = HandshakeWire.Message(kind: request.kind, json: replyJSON, legacy: request.legacy).encoded
        let deadline = MonotonicClock.nanoseconds() + UInt64(limits.replyDeadlineMs) * 1_000_000
        var sent = 0
        while sent < reply.count {
            let n = reply.withUnsafeBytes { Glibc.send(connection.fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
            if n > 0 { sent += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                enqueue(.replyRest(connection, rest: Array(reply[sent...]), peer: peer, deadline: deadline))
            } else {
                connection.close()  // the client is gone
            }
            return true
        }
        connection.shutdownWrite()
        // The I/O thread (this one) takes it back on its next pass: no wake-up.
        if !handBack(connection) { connection.close() }
        return true
    }

    /// Sends the rest of a reply the I/O thread began, by the deadline set when it began.
    private func finishReply(_ connection: Socket, rest: [UInt8], peer: String, deadline: UInt64) {
        _ = fcntl(connection.fd, F_SETFL, fcntl(connection.fd, F_GETFL) & ~O_NONBLOCK)
        connection.setTimeouts(receiveMs: 1000, sendMs: min(1000, limits.replyDeadlineMs))
        do {
            try rest.withUnsafeBytes { try connection.sendAll([$0], deadline: deadline, callLimitMs: min(1000, limits.replyDeadlineMs)) }
            connection.shutdownWrite()
        } catch {
            logger.debug("handshake: reply to \(peer) not sent whole: \(error)", metadata: ["peer": "\(peer)"])
            connection.close()
            return
        }
        linger(connection)
    }

    private func answer(_ connection: Socket, body: [UInt8], peer: String) {
        _ = fcntl(connection.fd, F_SETFL, fcntl(connection.fd, F_GETFL) & ~O_NONBLOCK)
        connection.setTimeouts(receiveMs: 1000, sendMs: min(1000, limits.replyDeadlineMs))
        do {
            let request = try HandshakeWire.decodeBody(body)
            guard let replyJSON = handler(request) else {
                onBadMessage?()
                logger.warning("handshake: refused a \(request.kind) message from \(peer)", metadata: ["peer": "\(peer)"])
                connection.close()
                return
            }
            let reply = HandshakeWire.Message(kind: request.kind, json: replyJSON, legacy: request.legacy)
            let deadline = MonotonicClock.nanoseconds() + UInt64(limits.replyDeadlineMs) * 1_000_000
            try reply.encoded.withUnsafeBytes { try connection.sendAll([$0], deadline: deadline) }
            connection.shutdownWrite()
        } catch {
            onBadMessage?()
            logger.warning("handshake: bad message from \(peer): \(error)", metadata: ["peer": "\(peer)"])
            connection.close()
            return
        }
        linger(connection)
    }

    /// Hands a replied connection back to the I/O thread. Upstream clients close first; the I/O
    /// thread waits (briefly) for that, so the reply is not reset and no worker is held by a
    /// client that never closes.
    private func linger(_ connection: Socket) {
        _ = fcntl(connection.fd, F_SETFL, fcntl(connection.fd, F_GETFL) | O_NONBLOCK)
        if handBack(connection) { wake() } else { connection.close() }
    }

    /// Queues a replied connection for the I/O thread to wait on; false once stop began (the I/O
    /// thread takes nothing back then, and the caller closes it).
    private func handBack(_ connection: Socket) -> Bool {
        shared.withLock { state -> Bool in
            guard !state.stopped else { return false }
            state.lingering.append(connection)
            return true
        }
    }

    /// Hands a job to the workers (or refuses it when they are that far behind).
    func enqueue(_ job: Job) {
        enum Outcome { case queued, full, stopped }
        let outcome = shared.withLock { state -> Outcome in
            if state.stopped { return .stopped }  // no worker would take it
            guard state.queue.count < limits.maxQueued else { return .full }
            state.queue.append(job)
            return .queued
        }
        if outcome == .queued { shared.signalOne() } else if outcome == .stopped { job.socket.close() } else {
            if case .replyRest = job {
                warnLimit("handshake: \(limits.maxQueued) requests already wait for a worker; a reply to \(job.peer) is cut short")
            } else {
                warnLimit("handshake: \(limits.maxQueued) requests already wait for an answer; closing \(job.peer)")
            }
            job.socket.close()
        }
    }

    /// A warning at most every 10 s (a flood must not flood the log too).
    func warnLimit(_ message: String) {
        let now = MonotonicClock.nanoseconds()
        if shared.withLock({ $0.limitWarnings.record(now: now) }) != nil {
            logger.warning("\(message) (further limit warnings in the next 10 s are not shown)")
        }
    }
}
