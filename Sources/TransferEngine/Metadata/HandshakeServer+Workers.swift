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

    /// A worker's task: a request to answer, or the rest of a reply the I/O thread began.
    struct Job {
        let socket: Socket
        /// The request's body, or the reply bytes still to send.
        let bytes: [UInt8]
        let peer: String
        let isReplyRest: Bool
        /// For a reply's rest: when the whole reply must have been sent (monotonic ns); 0 for a request.
        let deadline: UInt64
    }

    func workerLoop() {
        while true {
            let next = shared.wait(until: { state -> Job?? in
                if state.stopped { return .some(nil) }
                return state.queue.popFirst().map { .some($0) }
            })
            guard let job = next ?? nil else { return }
            if job.isReplyRest { finishReply(job.socket, rest: job.bytes, peer: job.peer, deadline: job.deadline) } else { answer(job.socket, body: job.bytes, peer: job.peer) }
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
                enqueue(Job(socket: connection, bytes: Array(reply[sent...]), peer: peer, isReplyRest: true, deadline: deadline))
            } else {
                connection.close()  // the client is gone
            }
            return true
        }
        connection.shutdownWrite()
        // The I/O thread (this one) takes it back on its next pass, unless stop began.
        let kept = shared.withLock { state -> Bool in
            guard !state.stopped else { return false }
            state.lingering.append(connection)
            return true
        }
        if !kept { connection.close() }
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
        // Once stopped, the I/O thread takes nothing back: closed here.
        let kept = shared.withLock { state -> Bool in
            guard !state.stopped else { return false }
            state.lingering.append(connection)
            return true
        }
        if kept { wake() } else { connection.close() }
    }
}
