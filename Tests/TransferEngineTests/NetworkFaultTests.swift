import Foundation
import Testing
@testable import TransferEngine

/// Real network faults between two engine processes: the target runs in a network namespace the
/// test creates, joined to this one by a veth pair (addresses only on that pair), and the link is
/// broken with `tc netem` (every packet dropped) or by deleting the namespace. Needs root and
/// iproute2; scripts/test.sh runs it as root.
@Suite("Network faults between namespaces", .serialized,
       .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
                && FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc"), "needs root and iproute2 (ip, tc)"))
struct NetworkFaultTests {
    /// A namespace with a veth pair to this one: `hostAddress` here, `peerAddress` inside.
    final class Namespace: @unchecked Sendable {
        let name: String
        let hostLink: String
        let hostAddress: String
        let peerAddress: String

        init() throws {
            let tag = String(UInt32.random(in: 0..<0xFFFF), radix: 16)
            name = "te-fault-\(tag)"
            hostLink = "teh\(tag)"
            let subnet = Int.random(in: 1...250)
            hostAddress = "10.213.\(subnet).1"
            peerAddress = "10.213.\(subnet).2"
            try Self.ip(["netns", "add", name])
            try Self.ip(["link", "add", hostLink, "type", "veth", "peer", "name", "ten\(tag)"])
            try Self.ip(["link", "set", "ten\(tag)", "netns", name])
            try Self.ip(["addr", "add", "\(hostAddress)/30", "dev", hostLink])
            try Self.ip(["link", "set", hostLink, "up"])
            try Self.ip(["netns", "exec", name, "ip", "addr", "add", "\(peerAddress)/30", "dev", "ten\(tag)"])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", "ten\(tag)", "up"])
            try Self.ip(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
        }

        static func ip(_ arguments: [String]) throws {
            let (status, _, error) = try TestSupport.run("/usr/sbin/ip", arguments, timeout: 20)
            guard status == 0 else { throw TestFailure("ip \(arguments.joined(separator: " ")): \(error)") }
        }

        /// How the last partition was made: netem where the kernel has it, else the link taken down.
        private(set) var partitionKind = ""

        /// Drops every packet between the two sides: `tc netem loss 100%` (kernels without
        /// sch_netem: the host end of the pair set down, which drops them as well).
        func partition() throws {
            let (status, _, _) = try TestSupport.run("/usr/sbin/tc", ["qdisc", "add", "dev", hostLink, "root", "netem", "loss", "100%"], timeout: 20)
            if status == 0 { partitionKind = "netem loss 100%"; return }
            try Self.ip(["link", "set", hostLink, "down"])
            partitionKind = "link down"
        }

        func heal() throws {
            if partitionKind == "link down" {
                try Self.ip(["link", "set", hostLink, "up"])
                try Self.ip(["addr", "replace", "\(hostAddress)/30", "dev", hostLink])
            } else {
                let (status, _, error) = try TestSupport.run("/usr/sbin/tc", ["qdisc", "del", "dev", hostLink, "root"], timeout: 20)
                guard status == 0 else { throw TestFailure("tc: \(error)") }
            }
        }

        /// Delays and drops packets in both directions (`tc netem` on both ends of the pair).
        func impair(_ netem: [String]) throws {
            for (prefix, link) in [([String](), hostLink), (["/usr/sbin/ip", "netns", "exec", name], "ten" + hostLink.dropFirst(3))] {
                let command = prefix + ["/usr/sbin/tc", "qdisc", "replace", "dev", link, "root", "netem"] + netem
                let (status, _, error) = try TestSupport.run(command[0], Array(command.dropFirst()), timeout: 20)
                guard status == 0 else { throw TestFailure("tc: \(error)") }
            }
        }

        /// Whether this kernel has netem (the test guest's Debian kernel does; some CI kernels do not).
        static let netemAvailable: Bool = {
            guard getuid() == 0 else { return false }
            _ = try? TestSupport.run("/sbin/modprobe", ["-q", "sch_netem"], timeout: 20)
            return FileManager.default.fileExists(atPath: "/sys/module/sch_netem")
        }()

        /// Deletes the namespace's name (it lives on while a process runs in it).
        func delete() { _ = try? Self.ip(["netns", "del", name]) }

        /// Removes the veth pair: the peer's end goes with ours, and with it every packet, without a
        /// FIN or RST reaching us (a peer whose host vanished).
        func cut() throws { try Self.ip(["link", "del", hostLink]) }

        deinit {
            delete()
            _ = try? TestSupport.run("/usr/sbin/ip", ["link", "del", hostLink], timeout: 20)
        }
    }

    private static let settings = ["MC_TCP_STATUS_TIMEOUT_SEC": "3", "MC_HANDSHAKE_CONNECT_TIMEOUT": "2", "MC_TRANSFER_TIMEOUT": "5"]

    @Test("a partition mid-batch ends every task within the deadline with a reason, other peers are served meanwhile, and after healing new transfers succeed; a vanished peer is detected")
    func partitionAndVanish() throws {
        let namespace = try Namespace()
        let target = try ServeProcess(bufferSize: "64MiB", environment: TestSupport.cleanEnvironment(Self.settings),
                                      localHostname: namespace.peerAddress, launcher: ["/usr/sbin/ip", "netns", "exec", namespace.name])
        let engine = try TransferEngine(configuration: EngineConfiguration(localHostname: namespace.hostAddress),
                                        environment: TestSupport.cleanEnvironment(Self.settings))
        defer { engine.shutdown() }
        let local = TestBuffer(8 << 20)
        local.fillPattern(seed: 5)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        let handle = try engine.openSegment(target.segment)
        try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 1 << 20)

        // Partition while a batch of 8 x 1 MiB is on its way.
        let batch = try engine.allocateBatch(capacity: 8)
        try namespace.partition()
        let started = Date()
        try engine.submit((0..<8).map { i in
            TransferRequest(operation: .write, localAddress: local.address + UInt64(i) << 20, segment: handle,
                            remoteAddress: target.bufferAddress + UInt64(i) << 20, length: 1 << 20)
        }, to: batch)
        // Meanwhile another peer (over loopback) is served as usual.
        let other = try ServeProcess(bufferSize: "1MiB")
        let otherHandle = try engine.openSegment(other.segment)
        let beside = Date()
        try engine.transferSync(.write, localAddress: local.address, segment: otherHandle, remoteAddress: other.bufferAddress, length: 65536)
        #expect(Date().timeIntervalSince(beside) < 2, "a partitioned peer held up another one")
        #expect(try engine.wait(batch: batch, timeoutNs: 30_000_000_000), "tasks still running 30 s into the partition")
        let elapsed = Date().timeIntervalSince(started)
        let statuses = try engine.statuses(batch: batch)
        // Failed, or timed out when the deadline came first (a later run still waiting to connect).
        #expect(statuses.allSatisfy { ($0.state == .failed || $0.state == .timeout) && ($0.error ?? "").isEmpty == false }, "\(statuses)")
        #expect(elapsed < 20, "the batch took \(elapsed) s to end")
        print("network faults (\(namespace.partitionKind)): a partitioned batch of 8 ended after \(String(format: "%.1f", elapsed)) s; first reason: \(statuses.first?.error ?? "-")")
        try engine.freeBatch(batch)

        // Healed: new transfers succeed without restarting anything (a few tries while lanes reconnect).
        try namespace.heal()
        var healed = false
        for _ in 0..<20 where !healed {
            healed = (try? engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress,
                                               length: 1 << 20)) != nil
            if !healed { usleep(250_000) }
        }
        #expect(healed, "no transfer succeeded after the partition healed")

        // The peer vanishes without a word (the link between us removed): the next transfer fails
        // within the unacknowledged-data and status timeouts instead of hanging.
        try namespace.cut()
        let vanished = Date()
        #expect(throws: EngineError.self) {
            try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 1 << 20)
        }
        #expect(Date().timeIntervalSince(vanished) < 15)
    }

    @Test("delay and loss on the link (netem, both directions): every byte of 16 x 256 KiB each way right in bounded time, the delay shows in the latency, a deadline shorter than the delay ends the transfer",
          .enabled(if: Namespace.netemAvailable, "the kernel has no sch_netem (scripts/vm/test-netem.sh runs this in the test guest)"))
    func delayAndLoss() throws {
        let namespace = try Namespace()
        let target = try ServeProcess(bufferSize: "64MiB", environment: TestSupport.cleanEnvironment(Self.settings),
                                      localHostname: namespace.peerAddress, launcher: ["/usr/sbin/ip", "netns", "exec", namespace.name])
        let engine = try TransferEngine(configuration: EngineConfiguration(localHostname: namespace.hostAddress),
                                        environment: TestSupport.cleanEnvironment(["MC_TRANSFER_TIMEOUT": "30"]))
        defer { engine.shutdown() }
        let local = TestBuffer(4 << 20), back = TestBuffer(4 << 20)
        local.fillPattern(seed: 9)
        try engine.registerMemory(address: local.address, length: UInt64(local.count))
        try engine.registerMemory(address: back.address, length: UInt64(back.count))
        let handle = try engine.openSegment(target.segment)

        try namespace.impair(["delay", "10ms", "loss", "2%"])
        var started = Date()
        try engine.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: target.bufferAddress, length: 4096)
        let small = Date().timeIntervalSince(started)
        #expect(small >= 0.02, "a 4 KiB write took \(small) s on a link with 10 ms each way")
        started = Date()
        for (operation, buffer) in [(TransferRequest.Operation.write, local), (.read, back)] {
            let batch = try engine.allocateBatch(capacity: 16)
            try engine.submit((0..<16).map { i in
                TransferRequest(operation: operation, localAddress: buffer.address + UInt64(i) << 18, segment: handle,
                                remoteAddress: target.bufferAddress + UInt64(i) << 18, length: 1 << 18)
            }, to: batch)
            #expect(try engine.wait(batch: batch, timeoutNs: 60_000_000_000), "\(operation) batch still running after 60 s")
            let statuses = try engine.statuses(batch: batch)
            #expect(statuses.allSatisfy { $0.state == .completed }, "\(statuses)")
            try engine.freeBatch(batch)
        }
        let elapsed = Date().timeIntervalSince(started)
        #expect(back.equals(local, length: 4 << 20), "bytes differ after the round trip through delay and loss")
        print("network faults (netem delay 10ms loss 2% both ways): 4 KiB write \(String(format: "%.0f", small * 1000)) ms, 4 MiB written and read back in \(String(format: "%.1f", elapsed)) s")

        // A delay longer than the request's deadline: the transfer ends with an error at about the deadline.
        let impatient = try TransferEngine(configuration: EngineConfiguration(localHostname: namespace.hostAddress),
                                           environment: TestSupport.cleanEnvironment(["MC_TRANSFER_TIMEOUT": "1", "MC_TCP_STATUS_TIMEOUT_SEC": "1"]))
        defer { impatient.shutdown() }
        try impatient.registerMemory(address: local.address, length: UInt64(local.count))
        let impatientHandle = try impatient.openSegment(target.segment)
        try namespace.impair(["delay", "3000ms"])
        started = Date()
        #expect(throws: EngineError.self) {
            try impatient.transferSync(.write, localAddress: local.address, segment: impatientHandle, remoteAddress: target.bufferAddress, length: 65536)
        }
        let waited = Date().timeIntervalSince(started)
        #expect(waited >= 0.9 && waited < 8, "a 1 s deadline ended after \(waited) s")
    }
}
