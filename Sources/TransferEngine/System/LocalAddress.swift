#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The local address the kernel would send from to reach a destination.
enum LocalAddress {
    /// Connects a UDP socket to `host:port` (nothing is sent) and reads the address it was bound
    /// to: the address of the interface that routes there. Nil when there is no route.
    static func toward(host: String, port: UInt16) -> String? {
        guard let target = (try? SocketAddress.resolve(host: host, port: port))?.first else { return nil }
        let fd = socket(target.family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard target.withSockAddr({ connect(fd, $0, $1) }) == 0 else { return nil }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return rc == 0 ? SocketAddress(storage: storage, length: length).host : nil
    }
}
