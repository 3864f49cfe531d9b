import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Testing
@testable import TransferEngine

/// Bounded read-direction buffers between processes of one host, and how runs of reads are
/// sized, over real loopback sockets and real engines.
@Suite("Same-host buffers and read runs")
struct SameHostBuffersTests {
    private static func bufferSize(_ fd: Int32, _ option: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, option, &value, &length)
        return value
    }

    /// What the kernel makes of a request of `bytes` for `option`: it caps a request at
    /// net.core.[rw]mem_max and doubles it. The cap is probed with a huge request on a scratch
    /// socket (the sysctl files are missing in some network namespaces).
    private static func expected(_ option: Int32, bytes: Int32 = SameHostBuffers.bytes) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var huge: Int32 = 1 << 30
        setsockopt(fd, SOL_SOCKET, option, &huge, socklen_t(MemoryLayout<Int32>.size))
        return min(2 * bytes, bufferSize(fd, option))
    }

    @Test("IP addresses: IPv4, IPv6 and IPv4 mapped into IPv6; loopback ones; which peers are on this host")
    func addresses() throws {
        func address(_ host: String) throws -> SocketAddress { try #require(SocketAddress.numeric(host: host, port: 1)) }
        #expect(try address("10.1.2.3").ipBytes == [10, 1, 2, 3])
        #expect(try !address("10.1.2.3").isLoopback)
        #expect(try address("::ffff:10.1.2.3").ipBytes == [10, 1, 2, 3])
        #expect(try address("127.5.0.1").isLoopback)
        #expect(try address("::ffff:127.0.0.1").isLoopback)
        #expect(try address("::1").isLoopback)
        #expect(try address("fe80::1").ipBytes.count == 16)
        #expect(try !address("fe80::1").isLoopback)
        #expect(try SameHostBuffers.isSameHost(peer: address("127.0.0.1"), local: address("127.0.0.1")))
        #expect(try SameHostBuffers.isSameHost(peer: address("10.1.2.3"), local: address("::ffff:10.1.2.3")))
        #expect(try !SameHostBuffers.isSameHost(peer: address("10.1.2.4"), local: address("10.1.2.3")))
        #expect(try !SameHostBuffers.isSameHost(peer: address("fe80::2"), local: address("fe80::1")))
    }

    @Test("a loopback connection: the lane's receive and send buffers and the server's send buffer are bounded, the server's receive buffer is not")
    func loopbackConnectionIsBounded() throws {
        let listener = try Socket.listen(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        let client = try Socket.connect(host: "127.0.0.1", port: listener.localAddress.port, timeoutMs: 2000)
        defer { client.close() }
        let server = try #require(try listener.accept())
        defer { server.close() }
        #expect(SameHostBuffers.isSameHost(client))
        #expect(SameHostBuffers.isSameHost(server))
        let serverReceive = Self.bufferSize(server.fd, SO_RCVBUF)
        SameHostBuffers.apply(to: client, side: .lane)
        SameHostBuffers.apply(to: server, side: .server)
        #expect(Self.bufferSize(client.fd, SO_RCVBUF) == Self.expected(SO_RCVBUF))
        #expect(Self.bufferSize(server.fd, SO_SNDBUF) == Self.expected(SO_SNDBUF))
        #expect(Self.bufferSize(client.fd, SO_SNDBUF) == Self.expected(SO_SNDBUF, bytes: SameHostBuffers.laneSendBytes))
        // The server's receive side keeps autotuning.
        #expect(Self.bufferSize(server.fd, SO_RCVBUF) == serverReceive)
    }

    @Test("between two engines on this host, batches of writes and reads run on lanes with bounded receive and send buffers, served from bounded send buffers (ss)")
    func enginesBoundTheirConnections() throws {
        let target = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        let initiator = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { initiator.shutdown(); target.shutdown() }
        let block = 1 << 20
        let served = TestBuffer(8 * block), local = TestBuffer(8 * block)
        served.fillPattern(seed: 3)
        try target.registerMemory(address: served.address, length: UInt64(served.count))
        try initiator.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try initiator.openSegment(target.segmentName)
        let requests = (0..<8).map { i in
            TransferRequest(operation: .read, localAddress: local.address + UInt64(i * block), segment: handle,
                            remoteAddress: served.address + UInt64(i * block), length: UInt64(block))
        }
        let batch = try initiator.allocateBatch(capacity: requests.count)
        try initiator.submit(requests, to: batch)
        #expect(try initiator.wait(batch: batch, timeoutNs: 30_000_000_000))
        #expect(local.equals(served, length: served.count))
        // Writes back from a shifted pattern, over the same lanes.
        local.fillPattern(seed: 5)
        let writes = requests.map { TransferRequest(operation: .write, localAddress: $0.localAddress, segment: handle,
                                                    remoteAddress: $0.remoteAddress, length: $0.length) }
        let writeBatch = try initiator.allocateBatch(capacity: writes.count)
        try initiator.submit(writes, to: writeBatch)
        #expect(try initiator.wait(batch: writeBatch, timeoutNs: 30_000_000_000))
        #expect(served.equals(local, length: local.count))
        // The lanes keep their connections open (they retire after 30 s idle): list them.
        let port = target.dataPort
        let (status, out, err) = try TestSupport.run("/usr/bin/env", ["ss", "-tmnH", "state", "established", "( sport = :\(port) or dport = :\(port) )"])
        #expect(status == 0, "ss: \(err)")
        var serverSends: [Int32] = [], laneReceives: [Int32] = [], laneSends: [Int32] = []
        let pattern = try NSRegularExpression(pattern: #"\S+:(\d+)\s+\S+:(\d+)\s*\n\s*skmem:\(([^)]*)\)"#)
        for match in pattern.matches(in: out, range: NSRange(out.startIndex..., in: out)) {
            let field = { (i: Int) in String(out[Range(match.range(at: i), in: out)!]) }
            let memory = Dictionary(field(3).split(separator: ",").compactMap { item -> (String, Int32)? in
                guard let digits = item.firstIndex(where: \.isNumber) else { return nil }
                return (String(item[..<digits]), Int32(item[digits...]) ?? -1)
            }, uniquingKeysWith: { first, _ in first })
            if field(1) == "\(port)" {
                serverSends.append(memory["tb"] ?? -1)
            } else {
                laneReceives.append(memory["rb"] ?? -1)
                laneSends.append(memory["tb"] ?? -1)
            }
        }
        #expect(!serverSends.isEmpty && !laneReceives.isEmpty, "ss listed no data connection: \(out)")
        #expect(serverSends.allSatisfy { $0 == Self.expected(SO_SNDBUF) }, "server send buffers \(serverSends)")
        #expect(laneReceives.allSatisfy { $0 == Self.expected(SO_RCVBUF) }, "lane receive buffers \(laneReceives)")
        #expect(laneSends.allSatisfy { $0 == Self.expected(SO_SNDBUF, bytes: SameHostBuffers.laneSendBytes) }, "lane send buffers \(laneSends)")
    }

    @Test("runs of reads: a short queue is shared among the lanes that can take it, in runs of 1 to 16 MiB")
    func readRunBudget() {
        let mib: UInt64 = 1 << 20
        // A 4 MiB request (four 1 MiB slices) with two lanes free: two runs of 2 MiB.
        #expect(TCPChannel.readRunBudget(queuedBytes: 4 * mib, availableLanes: 2) == 2 * mib)
        // The last free lane takes the rest.
        #expect(TCPChannel.readRunBudget(queuedBytes: 2 * mib, availableLanes: 1) == 2 * mib)
        // Rounded up, so no slice is left over for a lane that is busy.
        #expect(TCPChannel.readRunBudget(queuedBytes: 3 * mib + 1, availableLanes: 2) == 3 * mib / 2 + 1)
        // A small batch stays on one lane.
        #expect(TCPChannel.readRunBudget(queuedBytes: 256 << 10, availableLanes: 2) == mib)
        #expect(TCPChannel.readRunBudget(queuedBytes: 64 * mib, availableLanes: 1) == 16 * mib)
        #expect(TCPChannel.readRunBudget(queuedBytes: .max, availableLanes: 0) == 16 * mib)
    }
}
