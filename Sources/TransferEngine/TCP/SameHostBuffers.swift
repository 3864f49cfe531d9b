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
/// receiver; a queue larger than the caches makes the second copy read from memory. A lane's run
/// of reads (up to 16 MiB) is answered with one send, so that queue grew that far, and batches of
/// large reads ran a third slower than the same writes, whose runs keep at most 2 MiB in flight
/// (README, "Performance"). So the read direction is bounded: the data server's send buffer on
/// every same-host connection (it cannot tell a lane from a synchronous or official client), and
/// a lane's receive buffer. The synchronous path's connections keep an autotuned receive buffer
/// (bounded, a single 1 MiB read waited for window updates), and the write direction is left
/// alone (bounded, writes slowed: the sender blocked more often). Connections to other hosts keep
/// autotuning, which they need to fill a path with a longer round trip.
enum SameHostBuffers {
    /// Requested buffer size, the same for a lane's receive buffer and the server's send buffer.
    /// The kernel caps a request at `net.core.rmem_max`/`wmem_max` and doubles it for its
    /// bookkeeping: about 512 KiB under 4 MiB caps (this kernel's default, where it was measured),
    /// 416 KiB under 212992 (older kernels' default, where the former 1 MiB request gave the same).
    /// For a lane the two sizes go together: with either end left at 1 MiB, or a 256-512 KiB
    /// TCP_WINDOW_CLAMP in place of the lane's smaller buffer, batched reads ran slower than with
    /// both at either size (a send buffer beyond the window lets the sender queue past it, and its
    /// segments then leave from the receiver's acknowledgements). Synchronous and official clients
    /// keep an autotuned receive buffer against this send buffer, by design (see above); a
    /// synchronous 1 MiB read measured 0.99x of the 1 MiB request. Measured on loopback against
    /// 1 MiB requests (README, "Performance"): 128, 192, 256 and 320 KiB, 256 KiB the best.
    static let bytes: Int32 = 256 << 10

    /// Which end of a data connection a socket is.
    enum Side {
        /// A client lane's connection, which receives batched reads.
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

    /// Bounds the read direction's buffer of `socket` when its peer is on this host (call it
    /// before any data arrives); other connections are left alone.
    static func apply(to socket: Socket, side: Side) {
        guard isSameHost(socket) else { return }
        socket.setBufferSize(side == .lane ? SO_RCVBUF : SO_SNDBUF, bytes)
    }
}
