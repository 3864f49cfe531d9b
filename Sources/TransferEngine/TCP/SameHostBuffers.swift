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
/// large reads ran a third slower than the same writes (README, "Performance"). So the read
/// direction is bounded: the data server's send buffer on every same-host connection (it cannot
/// tell a lane from a synchronous or official client), and a lane's receive buffer. A lane's send
/// buffer (its writes) is bounded too, smaller: with an autotuned one, half of a batched write's
/// CPU time went into the sender's copy into freshly allocated buffer pages, three times the
/// receiver's copy out of them. The synchronous path's connections keep autotuned buffers
/// (bounded, a single 1 MiB read waited for window updates, and a 1 MiB write measured slower
/// quiet), and so does the server's receive side (bounded as well, batched writes slowed).
/// Connections to other hosts keep autotuning, which they need to fill a path with a longer
/// round trip.
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

    /// Requested size of a lane's send buffer (about 256 KiB once the kernel doubles it). Measured
    /// on loopback against autotuning, batched writes of 1-4 MiB: 96, 128, 192 and 256 KiB gave
    /// 1.06-1.22x, 128 KiB the best; 64 KiB fell back (README, "Performance").
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
