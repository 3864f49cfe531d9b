#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Socket buffer sizes for data connections whose two ends are on this host.
///
/// Between processes of one host the kernel's buffer autotuning lets a stream's queue grow to
/// tens of MiB (`tcp_rmem`'s maximum), far more than a loopback path needs (its round trip is
/// microseconds). Every queued byte is copied twice, into the queue by the sender and out by the
/// receiver, and a queue larger than the caches makes those copies go to memory. So both
/// directions of a lane are bounded: its receive buffer and, on every same-host connection, the
/// data server's send buffer (which cannot tell a lane from a synchronous or official client) for
/// reads, whose runs of up to 16 MiB are answered with one send; the lane's send buffer for writes,
/// smaller, so the sending copy reuses buffer pages still in cache. The synchronous path's client
/// sockets keep autotuning (bounded, a single 1 MiB read waited for window updates), and so does
/// the server's receive side (bounding it did not help writes). Connections to other hosts keep
/// autotuning, which they need to fill a path with a longer round trip. README, "Performance",
/// has the measurements behind each choice.
enum SameHostBuffers {
    /// Requested buffer size, the same for a lane's receive buffer and the server's send buffer
    /// (the two go together: a send buffer beyond the receiver's window lets the sender queue past
    /// it). The kernel caps a request at `net.core.rmem_max`/`wmem_max` and doubles it for its
    /// bookkeeping: about 512 KiB under 4 MiB caps, 416 KiB under 212992 (older kernels' default).
    static let bytes: Int32 = 256 << 10

    /// Requested size of a lane's send buffer, about 256 KiB once the kernel doubles it.
    static let laneSendBytes: Int32 = 128 << 10

    /// Which end of a data connection a socket is.
    enum Side {
        /// A client lane's connection, which receives batched reads and sends batched writes.
        case lane
        /// A data server's connection, which sends read data.
        case server
    }

    /// Whether `socket`'s peer is on this host.
    static func isSameHost(_ socket: Socket) -> Bool {
        isSameHost(peer: socket.peerAddress, local: socket.localAddress)
    }

    /// Whether a connection from `local` to `peer` stays on this host: the peer is a loopback
    /// address, or the connection's own address (the kernel routes that over loopback too).
    static func isSameHost(peer: SocketAddress, local: SocketAddress) -> Bool {
        if peer.isLoopback { return true }
        let ip = peer.ipBytes
        return !ip.isEmpty && ip == local.ipBytes
    }

    /// Bounds the buffers of `socket` when its peer is on this host (call it before any data
    /// moves): a lane's receive and send buffers, a server connection's send buffer. Other
    /// connections are left alone.
    static func apply(to socket: Socket, side: Side) {
        guard isSameHost(socket) else { return }
        switch side {
        case .lane:
            socket.setBufferSize(SO_RCVBUF, bytes)
            socket.setBufferSize(SO_SNDBUF, laneSendBytes)
        case .server:
            socket.setBufferSize(SO_SNDBUF, bytes)
        }
    }
}
