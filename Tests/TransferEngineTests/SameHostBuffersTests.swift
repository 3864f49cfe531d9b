#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Testing
@testable import TransferEngine

/// Bounded read-direction buffers between processes of one host, and how runs of reads are
/// sized, over real loopback sockets.
@Suite("Same-host buffers and read runs")
struct SameHostBuffersTests {
    private func bufferSize(_ socket: Socket, _ option: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(socket.fd, SOL_SOCKET, option, &value, &length)
        return value
    }

    /// The kernel doubles a requested size after capping it at net.core.[rw]mem_max.
    private func expected(_ cap: String) -> Int32 {
        let text = (try? String(contentsOfFile: "/proc/sys/net/core/\(cap)", encoding: .utf8)) ?? ""
        let limit = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? Int32.max
        return 2 * min(SameHostBuffers.bytes, limit)
    }

    @Test("IP addresses: IPv4, IPv6 and IPv4 mapped into IPv6; loopback ones")
    func addresses() throws {
        let v4 = try #require(SocketAddress.numeric(host: "10.1.2.3", port: 1))
        #expect(v4.ipBytes == [10, 1, 2, 3])
        #expect(!v4.isLoopback)
        let mapped = try #require(SocketAddress.numeric(host: "::ffff:10.1.2.3", port: 1))
        #expect(mapped.ipBytes == [10, 1, 2, 3])
        #expect(try #require(SocketAddress.numeric(host: "127.5.0.1", port: 1)).isLoopback)
        #expect(try #require(SocketAddress.numeric(host: "::ffff:127.0.0.1", port: 1)).isLoopback)
        #expect(try #require(SocketAddress.numeric(host: "::1", port: 1)).isLoopback)
        let v6 = try #require(SocketAddress.numeric(host: "fe80::1", port: 1))
        #expect(v6.ipBytes.count == 16)
        #expect(!v6.isLoopback)
    }

    @Test("a loopback connection: the lane's receive buffer and the server's send buffer are bounded, nothing else")
    func loopbackConnectionIsBounded() throws {
        let listener = try Socket.listen(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let client = try Socket.connect(host: "127.0.0.1", port: listener.localAddress.port, timeoutMs: 2000)
        defer { client.close() }
        let server = try #require(try listener.accept())
        defer { server.close() }
        #expect(SameHostBuffers.isSameHost(client))
        #expect(SameHostBuffers.isSameHost(server))
        let clientSend = bufferSize(client, SO_SNDBUF), serverReceive = bufferSize(server, SO_RCVBUF)
        SameHostBuffers.apply(to: client, side: .lane)
        SameHostBuffers.apply(to: server, side: .server)
        #expect(bufferSize(client, SO_RCVBUF) == expected("rmem_max"))
        #expect(bufferSize(server, SO_SNDBUF) == expected("wmem_max"))
        // The write direction keeps autotuning.
        #expect(bufferSize(client, SO_SNDBUF) == clientSend)
        #expect(bufferSize(server, SO_RCVBUF) == serverReceive)
    }

    @Test("runs of reads: a short queue is shared among the lanes that can take it, in runs of 1 to 16 MiB")
    func readRunBudget() {
        let mib: UInt64 = 1 << 20
        // A 4 MiB request (four 1 MiB slices) with two lanes free: two runs of 2 MiB.
        #expect(TCPChannel.readRunBudget(queuedBytes: 4 * mib, availableLanes: 2) == 2 * mib)
        // The last free lane takes the rest.
        #expect(TCPChannel.readRunBudget(queuedBytes: 2 * mib, availableLanes: 1) == 2 * mib)
        // Rounded up, so no slice is left over for a lane that is busy.
        #expect(TCPChannel.readRunBudget(queuedBytes: 3 * mib, availableLanes: 2) == 3 * mib / 2)
        // A small batch stays on one lane.
        #expect(TCPChannel.readRunBudget(queuedBytes: 256 << 10, availableLanes: 2) == mib)
        #expect(TCPChannel.readRunBudget(queuedBytes: 64 * mib, availableLanes: 1) == 16 * mib)
        #expect(TCPChannel.readRunBudget(queuedBytes: .max, availableLanes: 0) == 16 * mib)
    }
}
