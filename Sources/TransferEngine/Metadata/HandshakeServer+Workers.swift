import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The worker threads: each answers one handshake at a time, then leaves the connection to the
// I/O thread until the client closes it.

extension HandshakeServer {
    func workerLoop() {
        while true {
            let next = shared.wait(until: { state -> (Socket, [UInt8], String)?? in
                if state.stopped { return .some(nil) }
                return state.queue.popFirst().map { .some($0) }
            })
            guard let item = next ?? nil else { return }
            answer(item.0, body: item.1, peer: item.2)
        }
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
        // Upstream clients close first; the I/O thread waits (briefly) for that, so the reply
        // is not reset and no worker is held by a client that never closes.
        _ = fcntl(connection.fd, F_SETFL, fcntl(connection.fd, F_GETFL) | O_NONBLOCK)
        shared.withLock { $0.lingering.append(connection) }
        wake()
    }
}
