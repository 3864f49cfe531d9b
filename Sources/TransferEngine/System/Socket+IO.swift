#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SystemPackage

/// Sending and receiving whole messages: gathered and scattered system calls, total deadlines,
/// and the short spin before a blocking receive.
extension Socket {
    /// Before one system call of a loop with a total `deadline`: fails when it passed; when less
    /// than `callLimitMs` (the socket's usual timeouts) is left, the call may wait only that long.
    /// The common, distant deadline costs a clock read and no system call.
    private func bound(by deadline: UInt64, callLimitMs: Int, _ what: String) throws {
        let now = MonotonicClock.nanoseconds()
        guard now < deadline else { throw SocketError.timedOut(what) }
        guard callLimitMs > 0 else { return }
        let remainingMs = Int(min((deadline - now) / 1_000_000 + 1, UInt64(Int32.max)))
        if remainingMs < callLimitMs {
            setTimeouts(receiveMs: remainingMs, sendMs: remainingMs)
            timeoutsShortened = true
        }
    }

    /// Puts back the usual timeouts after `bound` shortened them.
    func restoreTimeouts(_ milliseconds: Int) {
        guard timeoutsShortened else { return }
        setTimeouts(receiveMs: milliseconds, sendMs: milliseconds)
        timeoutsShortened = false
    }

    /// Sends every byte of the given regions in order, gathering them into as few syscalls as possible;
    /// with a `deadline` (monotonic ns) the whole send fails once it passes, not only one call, and
    /// with `callLimitMs` (the socket's timeouts) no call waits past it either.
    func sendAll(_ parts: [UnsafeRawBufferPointer], deadline: UInt64? = nil, callLimitMs: Int = 0) throws {
        try Self.withVectors(parts.count, { parts[$0] }) { vectors in
            var index = 0
            while index < vectors.count {
                if let deadline { try bound(by: deadline, callLimitMs: callLimitMs, "send") }
                var message = msghdr()
                message.msg_iov = vectors.baseAddress! + index
                message.msg_iovlen = min(vectors.count - index, 1024)
                let sent = sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
                if sent < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK { throw SocketError.timedOut("send") }
                    throw SocketError.system(call: "send", errno: Errno(rawValue: errno))
                }
                Self.consume(sent, from: vectors, at: &index)
            }
        }
    }

    /// Runs `body` with the non-empty regions of `count` parts as an iovec list on the stack (a
    /// heap array here cost a small synchronous transfer two allocations and a metadata lookup).
    private static func withVectors<R>(_ count: Int, _ part: (Int) -> UnsafeRawBufferPointer,
                                       _ body: (UnsafeMutableBufferPointer<iovec>) throws -> R) throws -> R {
        try withUnsafeTemporaryAllocation(of: iovec.self, capacity: max(count, 1)) { buffer in
            var used = 0
            for i in 0..<count {
                let region = part(i)
                guard region.count > 0 else { continue }
                (buffer.baseAddress! + used).initialize(to: iovec(iov_base: UnsafeMutableRawPointer(mutating: region.baseAddress), iov_len: region.count))
                used += 1
            }
            return try body(UnsafeMutableBufferPointer(start: buffer.baseAddress, count: used))
        }
    }

    /// Advances an iovec list past `count` transferred bytes.
    private static func consume(_ count: Int, from vectors: UnsafeMutableBufferPointer<iovec>, at index: inout Int) {
        var remaining = count
        while remaining > 0, index < vectors.count {
            if remaining >= vectors[index].iov_len {
                remaining -= vectors[index].iov_len
                index += 1
            } else {
                vectors[index].iov_base += remaining
                vectors[index].iov_len -= remaining
                remaining = 0
            }
        }
    }

    /// Sends `count` bytes from `pointer`.
    func sendAll(_ pointer: UnsafeRawPointer, count: Int) throws {
        try sendAll([UnsafeRawBufferPointer(start: pointer, count: count)])
    }

    /// Receives exactly `count` bytes into `pointer` (straight into the destination).
    /// With a `deadline` (monotonic ns), a peer that trickles bytes cannot stretch the call past it.
    func receiveAll(_ pointer: UnsafeMutableRawPointer, count: Int, deadline: UInt64? = nil) throws {
        var received = 0
        while received < count {
            let n = recv(fd, pointer + received, count - received, Int32(MSG_WAITALL))
            if n > 0 {
                received += n
                if let deadline, received < count, MonotonicClock.nanoseconds() > deadline { throw SocketError.timedOut("receive") }
                continue
            }
            if n == 0 { throw SocketError.closedByPeer(expected: count, received: received) }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { throw SocketError.timedOut("receive") }
            throw SocketError.system(call: "recv", errno: Errno(rawValue: errno))
        }
    }

    /// Receives exactly the bytes of every region, in order, with as few syscalls as possible.
    /// With a `deadline` (monotonic ns) it fails once that passes, and with `callLimitMs` (the
    /// socket's timeouts) no call waits past it.
    func receiveAll(_ parts: [UnsafeMutableRawBufferPointer], deadline: UInt64? = nil, callLimitMs: Int = 0) throws {
        try Self.withVectors(parts.count, { UnsafeRawBufferPointer(parts[$0]) }) { vectors in
            let expected = vectors.reduce(0) { $0 + $1.iov_len }
            var total = 0
            var index = 0
            while index < vectors.count {
                if let deadline { try bound(by: deadline, callLimitMs: callLimitMs, "receive") }
                var message = msghdr()
                message.msg_iov = vectors.baseAddress! + index
                message.msg_iovlen = min(vectors.count - index, 1024)
                let n = recvmsg(fd, &message, Int32(MSG_WAITALL))
                if n == 0 { throw SocketError.closedByPeer(expected: expected, received: total) }
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK { throw SocketError.timedOut("receive") }
                    throw SocketError.system(call: "recvmsg", errno: Errno(rawValue: errno))
                }
                total += n
                Self.consume(n, from: vectors, at: &index)
            }
        }
    }

    /// One scatter receive of whatever is available (blocking until at least one byte); 0 = peer closed.
    func receiveSome(_ parts: [UnsafeMutableRawBufferPointer]) throws -> Int {
        try Self.withVectors(parts.count, { UnsafeRawBufferPointer(parts[$0]) }) { vectors in
            while true {
                var message = msghdr()
                message.msg_iov = vectors.baseAddress
                message.msg_iovlen = vectors.count
                let n = recvmsg(fd, &message, 0)
                if n >= 0 { return n }
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { throw SocketError.timedOut("receive") }
                throw SocketError.system(call: "recvmsg", errno: Errno(rawValue: errno))
            }
        }
    }

    /// `receiveSome` within a total `deadline` (monotonic ns): fails once it passed, and a call
    /// waits at most what is left of it (or the socket's own timeout, `callLimitMs`, if shorter).
    func receiveSome(_ pointer: UnsafeMutableRawPointer, count: Int, deadline: UInt64, callLimitMs: Int) throws -> Int {
        try bound(by: deadline, callLimitMs: callLimitMs, "receive")
        return try receiveSome(pointer, count: count)
    }

    /// Receives up to `count` bytes; 0 means the peer closed.
    func receiveSome(_ pointer: UnsafeMutableRawPointer, count: Int) throws -> Int {
        while true {
            let n = recv(fd, pointer, count, 0)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { throw SocketError.timedOut("receive") }
            throw SocketError.system(call: "recv", errno: Errno(rawValue: errno))
        }
    }

    /// Copies up to `count` already-received bytes without consuming them or waiting.
    func peekAvailable(_ pointer: UnsafeMutableRawPointer, count: Int) -> Int {
        max(0, recv(fd, pointer, count, Int32(MSG_DONTWAIT) | Int32(MSG_PEEK)))
    }

    /// Whether received bytes are waiting to be read (FIONREAD).
    var hasPendingInput: Bool {
        var available: Int32 = 0
        return ioctl(fd, UInt(FIONREAD), &available) == 0 && available > 0
    }

    /// Polls (without sleeping) until input is readable or `nanoseconds` pass.
    /// A blocked thread's wake-up costs more than a short spin for a loopback
    /// round trip, so synchronous small requests spin briefly before blocking.
    /// Returns true when input (or EOF/error) arrived before the time ran out.
    @discardableResult
    func spinUntilReadable(nanoseconds: UInt64) -> Bool {
        let end = MonotonicClock.nanoseconds() + nanoseconds
        var byte: UInt8 = 0
        repeat {
            if recv(fd, &byte, 1, Int32(MSG_DONTWAIT) | Int32(MSG_PEEK)) != -1 || (errno != EAGAIN && errno != EWOULDBLOCK) { return true }
        } while MonotonicClock.nanoseconds() < end
        return false
    }
}
