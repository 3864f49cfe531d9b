#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CTransferEngineShims
import SystemPackage

/// Errors raised by `Socket`.
enum SocketError: Error, CustomStringConvertible {
    /// The peer closed the connection before all expected bytes arrived.
    case closedByPeer(expected: Int, received: Int)
    /// A system call failed.
    case system(call: String, errno: Errno)
    /// Name resolution failed.
    case resolve(host: String, reason: String)
    /// A connect or I/O deadline passed.
    case timedOut(String)

    var description: String {
        switch self {
        case .closedByPeer(let expected, let received):
            return "connection closed by peer after \(received) of \(expected) bytes"
        case .system(let call, let errno): return "\(call): \(errno) (errno \(errno.rawValue))"
        case .resolve(let host, let reason): return "cannot resolve '\(host)': \(reason)"
        case .timedOut(let what): return "\(what) timed out"
        }
    }
}

/// An IPv4 or IPv6 socket address.
struct SocketAddress: CustomStringConvertible, Sendable {
    var storage = sockaddr_storage()
    var length: socklen_t = 0

    /// Resolves `host` (name, IPv4 or IPv6 literal; empty = wildcard) to addresses for TCP.
    static func resolve(host: String, port: UInt16, passive: Bool = false) throws -> [SocketAddress] {
        if let numeric = numeric(host: host, port: port) { return [numeric] }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let node = host.isEmpty ? nil : host
        let rc = node.withOptionalCString { getaddrinfo($0, String(port), &hints, &list) }
        guard rc == 0, let first = list else {
            throw SocketError.resolve(host: host, reason: String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(first) }
        var result: [SocketAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let entry = cursor {
            var address = SocketAddress()
            withUnsafeMutableBytes(of: &address.storage) { target in
                target.copyMemory(from: UnsafeRawBufferPointer(start: entry.pointee.ai_addr, count: Int(entry.pointee.ai_addrlen)))
            }
            address.length = entry.pointee.ai_addrlen
            // Prefer IPv4 first: loopback peers and Mooncake's client default to AF_INET.
            if entry.pointee.ai_family == AF_INET { result.insert(address, at: 0) } else { result.append(address) }
            cursor = entry.pointee.ai_next
        }
        return result
    }

    /// Parses an IPv4 or IPv6 literal without getaddrinfo (whose first call loads NSS modules).
    static func numeric(host: String, port: UInt16) -> SocketAddress? {
        var address = SocketAddress()
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr = v4
            withUnsafeBytes(of: sin) { source in
                withUnsafeMutableBytes(of: &address.storage) { $0.copyMemory(from: source) }
            }
            address.length = socklen_t(MemoryLayout<sockaddr_in>.size)
            return address
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            sin6.sin6_addr = v6
            withUnsafeBytes(of: sin6) { source in
                withUnsafeMutableBytes(of: &address.storage) { $0.copyMemory(from: source) }
            }
            address.length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            return address
        }
        return nil
    }

    var family: Int32 { Int32(storage.ss_family) }

    /// The numeric host part.
    var host: String {
        var buffer = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var copy = storage
        let rc = withUnsafePointer(to: &copy) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, length, &buffer, socklen_t(buffer.count), nil, 0, NI_NUMERICHOST)
            }
        }
        return rc == 0 ? String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
    }

    var port: UInt16 {
        switch family {
        case AF_INET:
            return withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self)) }
        case AF_INET6:
            return withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self)) }
        default: return 0
        }
    }

    var description: String { family == AF_INET6 ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// The IP address alone: 4 bytes (IPv4, or IPv4 mapped into IPv6) or 16 (IPv6); empty otherwise.
    var ipBytes: [UInt8] {
        withUnsafeBytes(of: storage) { raw in
            switch family {
            case AF_INET:
                return Array(raw[4..<8])  // sockaddr_in: family, port, address
            case AF_INET6:
                let address = Array(raw[8..<24])  // sockaddr_in6: family, port, flow info, address
                let mappedPrefix: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
                return Array(address[0..<12]) == mappedPrefix ? Array(address[12..<16]) : address
            default:
                return []
            }
        }
    }

    /// Whether this is a loopback address (127.0.0.0/8 or ::1).
    var isLoopback: Bool {
        let ip = ipBytes
        if ip.count == 4 { return ip[0] == 127 }
        return ip.count == 16 && ip[0..<15].allSatisfy { $0 == 0 } && ip[15] == 1
    }

    func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        var copy = storage
        return withUnsafePointer(to: &copy) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
    }
}

extension Optional where Wrapped == String {
    func withOptionalCString<R>(_ body: (UnsafePointer<CChar>?) -> R) -> R {
        switch self {
        case .some(let string): return string.withCString { body($0) }
        case .none: return body(nil)
        }
    }
}

/// A TCP socket: a typed wrapper over a file descriptor with whole-buffer I/O.
///
/// `sendAll`/`receiveAll` move bytes directly between the kernel and the
/// caller's memory (registered buffers), never through an intermediate copy.
final class Socket: @unchecked Sendable {
    private(set) var descriptor: FileDescriptor?
    /// Orders `close` (the owner) against `shutdownBoth` (any thread, e.g. an unregister ending a
    /// peer's copy): the only calls made on a socket from two threads. A pthread lock, which
    /// ThreadSanitizer sees (it cannot see through `Synchronization.Mutex`'s futex on Linux).
    private let lifecycle = ConditionLock(())

    init(descriptor: FileDescriptor) { self.descriptor = descriptor }

    deinit { close() }

    var fd: Int32 { descriptor?.rawValue ?? -1 }

    /// Connects to the first reachable address of host:port within `timeoutMs`.
    static func connect(host: String, port: UInt16, timeoutMs: Int) throws -> Socket {
        var lastError: Error = SocketError.resolve(host: host, reason: "no address")
        for address in try SocketAddress.resolve(host: host, port: port) {
            do { return try connect(to: address, timeoutMs: timeoutMs) } catch { lastError = error }
        }
        throw lastError
    }

    static func connect(to address: SocketAddress, timeoutMs: Int) throws -> Socket {
        let fd = Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw SocketError.system(call: "socket", errno: Errno(rawValue: errno)) }
        let socket = Socket(descriptor: FileDescriptor(rawValue: fd))
        let rc = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            guard errno == EINPROGRESS else { throw SocketError.system(call: "connect \(address)", errno: Errno(rawValue: errno)) }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ready = Glibc.poll(&pfd, 1, Int32(timeoutMs))
            if ready == 0 { throw SocketError.timedOut("connect to \(address)") }
            var soError: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
            if ready < 0 || soError != 0 {
                throw SocketError.system(call: "connect \(address)", errno: Errno(rawValue: soError != 0 ? soError : errno))
            }
        }
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~Int32(O_NONBLOCK))
        socket.setNoDelay()
        return socket
    }

    /// Binds and listens on host:port (port 0 = any). Empty host or "0.0.0.0"/"::" = all interfaces.
    static func listen(host: String, port: UInt16, backlog: Int32 = 128) throws -> Socket {
        var lastError: Error = SocketError.resolve(host: host, reason: "no address")
        for address in try SocketAddress.resolve(host: host, port: port, passive: true) {
            let fd = Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastError = SocketError.system(call: "socket", errno: Errno(rawValue: errno)); continue }
            let socket = Socket(descriptor: FileDescriptor(rawValue: fd))
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if address.withSockAddr({ Glibc.bind(fd, $0, $1) }) != 0 {
                lastError = SocketError.system(call: "bind \(address)", errno: Errno(rawValue: errno)); continue
            }
            if Glibc.listen(fd, backlog) != 0 {
                lastError = SocketError.system(call: "listen \(address)", errno: Errno(rawValue: errno)); continue
            }
            return socket
        }
        throw lastError
    }

    /// Accepts one connection; nil when the listener was closed.
    func accept() throws -> Socket? {
        while true {
            let client = te_accept_cloexec(fd)
            if client >= 0 {
                let socket = Socket(descriptor: FileDescriptor(rawValue: client))
                socket.setNoDelay()
                return socket
            }
            switch errno {
            case EINTR, ECONNABORTED, EPROTO: continue
            case EBADF, EINVAL: return nil
            case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                usleep(10_000)  // transient exhaustion: back off instead of spinning
                continue
            default: throw SocketError.system(call: "accept", errno: Errno(rawValue: errno))
            }
        }
    }

    /// The locally bound address.
    var localAddress: SocketAddress {
        var address = SocketAddress()
        address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &address.length) }
        }
        return address
    }

    /// The connected peer's address.
    var peerAddress: SocketAddress {
        var address = SocketAddress()
        address.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getpeername(fd, $0, &address.length) }
        }
        return address
    }

    func setNoDelay() {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Detects a peer that vanished without closing (crashed host, partition): keepalive probes
    /// after `idleSeconds` of silence, every `intervalSeconds`, `count` times; and unacknowledged
    /// sent data fails the connection after `userTimeoutMs` (TCP_USER_TIMEOUT).
    func setKeepAlive(idleSeconds: Int32 = 30, intervalSeconds: Int32 = 10, count: Int32 = 3, userTimeoutMs: UInt32) {
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        for (option, value) in [(TCP_KEEPIDLE, idleSeconds), (TCP_KEEPINTVL, intervalSeconds), (TCP_KEEPCNT, count)] {
            var v = value
            setsockopt(fd, Int32(IPPROTO_TCP), option, &v, socklen_t(MemoryLayout<Int32>.size))
        }
        var timeout = userTimeoutMs
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, &timeout, socklen_t(MemoryLayout<UInt32>.size))
    }

    /// Bounds every blocking receive/send; 0 disables the bound.
    func setTimeouts(receiveMs: Int, sendMs: Int) {
        for (option, ms) in [(SO_RCVTIMEO, receiveMs), (SO_SNDTIMEO, sendMs)] {
            var tv = timeval(tv_sec: ms / 1000, tv_usec: (ms % 1000) * 1000)
            setsockopt(fd, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// Sets one kernel buffer's size (`SO_SNDBUF` or `SO_RCVBUF`), which turns off its autotuning.
    func setBufferSize(_ option: Int32, _ bytes: Int32) {
        var value = bytes
        setsockopt(fd, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Sets both kernel buffer sizes.
    func setBufferSizes(_ bytes: Int32) {
        setBufferSize(SO_SNDBUF, bytes)
        setBufferSize(SO_RCVBUF, bytes)
    }

    /// Whether `bound(by:callLimitMs:)` shortened the socket's timeouts (the owner restores them).
    var timeoutsShortened = false

    /// Stops further sends; the peer sees EOF.
    func shutdownWrite() { Glibc.shutdown(fd, Int32(SHUT_WR)) }

    /// Wakes any thread blocked on this socket (accept/recv) and stops both directions. Safe from
    /// another thread than the owner's, also while the owner closes it: under the same lock as
    /// `close`, so it never reaches a descriptor number the kernel has handed to someone else.
    func shutdownBoth() {
        lifecycle.withLock { _ in
            if let descriptor { Glibc.shutdown(descriptor.rawValue, Int32(SHUT_RDWR)) }
        }
    }

    /// Closes with a reset instead of an orderly close: data still queued is dropped, not
    /// delivered (a request given up on must not reach the peer later).
    func abort() {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        close()
    }

    /// Closes the descriptor (idempotent).
    func close() {
        lifecycle.withLock { _ in
            if let descriptor {
                try? descriptor.close()
                self.descriptor = nil
            }
        }
    }
}
