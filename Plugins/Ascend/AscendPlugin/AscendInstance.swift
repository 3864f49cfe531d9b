import CAscendShim
import CTransportABI
import AscendRankInfo
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The ascend transport: one HIXL server per engine serves every registered
// buffer (NPU or host memory); one HIXL client per peer posts batched one-sided
// puts and gets; poll queries the batches' completion handles.

/// One plugin instance.
final class AscendInstance: TransportInstance, @unchecked Sendable {
    /// A batch posted to HIXL and the requests it carries.
    struct Batch {
        var link: AscendLink
        var complete: UnsafeMutableRawPointer
        var requests: [(cookie: UInt64, length: UInt64)]
        var deadline: UInt64
    }

    /// A peer; its fields are guarded by `state`.
    final class Peer {
        let info: AscendPeer
        var link: AscendLink?
        var closed = false
        /// When the last connect failed, and why (further tries wait `retryPause`).
        var failedAt: UInt64 = 0
        var failure: PluginFailure?
        init(_ info: AscendPeer) { self.info = info }
    }

    /// How long after a failed connect submits fail at once rather than connecting again.
    static let retryPause: UInt64 = 1_000_000_000

    let options: AscendOptions
    let host: HostServices
    let rank: LocalRankInfo
    let endpoints: [AscendEndpoint]
    private var server: UnsafeMutableRawPointer?
    /// Guards buffers, peers, generation and batches.
    private let state = Signal()
    private var buffers: [UInt64: (local: LocalBuffer, memory: UnsafeMutableRawPointer)] = [:]
    /// Bumped when local buffers change: links of an older generation are retired.
    private var generation: UInt64 = 0
    private var peers: [UInt64: Peer] = [:]
    private var nextPeer: UInt64 = 1
    private var batches: [Batch] = []
    /// Batches posted and not yet reaped (what HIXL counts), reserved before posting.
    private var unfinished = 0
    private var allocations: Set<UInt64> = []
    /// Guards `done`; one poller at a time queries HIXL (`reaping`).
    private let finished = Signal()
    private let reaping = Signal()
    private var done = CompletionQueue()

    /// Most batches in flight (HIXL allows 4096 unfinished per client).
    static let maxBatches = 4096

    /// Starts the HIXL server of NPU `options.device` (CANN already loaded by probe).
    init(options: AscendOptions, host: HostServices) throws(PluginFailure) {
        self.options = options
        self.host = host
        var physical: Int32 = 0
        var status = ascend_set_device(options.device)
        if status == 0 { status = ascend_physical_id(options.device, &physical) }
        guard status == 0 else { throw PluginFailure(TE_ERR_HARDWARE_ABSENT, cannFailure("aclrtSetDevice(\(options.device))", status)) }
        let phy = UInt32(bitPattern: physical)
        let deviceIP = IPAddress(options.deviceIP) ?? HCCNConf.read(options.hccnConf).flatMap { HCCNConf.deviceIP(in: $0, physicalID: phy) }
        endpoints = AscendEndpoint.local(physicalID: phy, deviceIP: deviceIP)
        let port = options.port != 0 ? options.port : AscendInstance.freePort(on: options.hostIP)
        rank = LocalRankInfo(hostIP: options.hostIP, port: port, logicalID: options.device, physicalID: phy, deviceIP: deviceIP, pid: getpid())
        let list = endpoints.map(\.shim)
        status = ascend_server_create(list, UInt32(list.count), options.hostIP, port, nil, &server)
        if status == 0 { status = ascend_server_listen(server, 64) }
        guard status == 0, server != nil else {
            close()
            throw .noResources(cannFailure("HIXL server on \(options.hostIP):\(port)", status) + (options.port != 0 ? " (MC_ASCEND_PORT)" : ""))
        }
        host.log(TE_LOG_INFO, "ascend plugin: npu:\(options.device) (physical \(phy)) serves on \(options.hostIP):\(port); endpoints \(endpoints.map { $0.kind.rawValue }.joined(separator: ","))\(deviceIP == nil ? " (no RoCE address in \(options.hccnConf); set MC_ASCEND_DEVICE_IP for links to other hosts)" : "")")
    }

    /// A port free on `ip` now (0 when none could be found: HIXL then refuses, with its reason).
    static func freePort(on ip: String) -> UInt32 {
        guard let address = IPAddress(ip) else { return 0 }
        let fd = socket(address.isIPv6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return 0 }
        defer { _ = Glibc.close(fd) }
        var storage = sockaddr_storage()
        var length: socklen_t
        if address.isIPv6 {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            withUnsafeMutableBytes(of: &a.sin6_addr) { $0.copyBytes(from: address.bytes) }
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: a, as: sockaddr_in6.self) }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            withUnsafeMutableBytes(of: &a.sin_addr) { $0.copyBytes(from: address.bytes) }
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: a, as: sockaddr_in.self) }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard bound == 0 else { return 0 }
        var size = socklen_t(MemoryLayout<sockaddr_storage>.size)
        guard withUnsafeMutablePointer(to: &storage, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &size) } }) == 0 else { return 0 }
        let port = withUnsafeBytes(of: &storage) { address.isIPv6 ? $0.load(as: sockaddr_in6.self).sin6_port : $0.load(as: sockaddr_in.self).sin_port }
        return UInt32(UInt16(bigEndian: port))
    }

    func localDescriptor() -> String { rank.json }

    func register(address: UInt64, length: UInt64, location: String) throws(PluginFailure) -> String {
        let device = try isOwnDevice(location)
        guard let server else { throw .invalid("the instance is closed") }
        if state.locked({ buffers[address] != nil }) { throw .invalid("0x\(String(address, radix: 16)) is already registered") }
        var memory: UnsafeMutableRawPointer?
        var status = ascend_set_device(options.device)
        if status == 0 { status = ascend_server_register(server, "te-\(String(address, radix: 16))", device ? 1 : 0, address, length, &memory) }
        guard status == 0, let memory else { throw .noResources(cannFailure("HixlCSServerRegMem(\(location), \(length) bytes)", status)) }
        let raced = state.locked { () -> Bool in
            if buffers[address] != nil { return true }
            buffers[address] = (LocalBuffer(length: length, device: device), memory)
            generation += 1
            return false
        }
        if raced {
            _ = ascend_server_unregister(server, memory)
            throw .invalid("0x\(String(address, radix: 16)) is already registered")
        }
        return "{\"ascend_mem\":\"\(device ? "device" : "host")\"}"
    }

    func unregister(address: UInt64) throws(PluginFailure) {
        guard let entry = state.locked({ () -> (local: LocalBuffer, memory: UnsafeMutableRawPointer)? in
            defer { generation += 1 }
            return buffers.removeValue(forKey: address)
        }) else { throw .invalid("0x\(String(address, radix: 16)) is not registered") }
        retireLinks()
        guard let server else { return }
        let status = ascend_server_unregister(server, entry.memory)
        guard status == 0 else { throw PluginFailure(TE_ERR_IO, cannFailure("HixlCSServerUnregMem", status) + ": peers may still reach the buffer") }
    }

    /// Local buffers changed: every link registered the old set.
    private func retireLinks() {
        let links = state.locked { peers.values.compactMap { peer -> AscendLink? in defer { peer.link = nil }; return peer.link } }
        for link in links { link.retire() }
    }

    func openPeer(segment: String, descriptor json: String) throws(PluginFailure) -> UInt64 {
        let info: AscendPeer
        do { info = try AscendPeer(json: json) } catch { throw PluginFailure(error.status, "\(segment): \(error.message)") }
        guard info.pair(with: endpoints, localHostIP: options.hostIP) != nil else {
            throw .unreachable("\(segment): no endpoint in common (HCCS joins NPUs of one host; RoCE needs an NPU address on both sides: MC_ASCEND_DEVICE_IP or /etc/hccn.conf)")
        }
        let peer = Peer(info)
        let handle = state.locked { () -> UInt64 in
            defer { nextPeer += 1 }
            peers[nextPeer] = peer
            return nextPeer
        }
        // Connect now, so the first transfer pays nothing; a failure here is retried on submit.
        do { _ = try link(for: peer) } catch {
            host.log(TE_LOG_DEBUG, "ascend plugin: \(segment): \(error.message); retried on the first transfer")
        }
        return handle
    }

    func closePeer(_ handle: UInt64) {
        let link = state.locked { () -> AscendLink? in
            guard let peer = peers.removeValue(forKey: handle) else { return nil }
            peer.closed = true
            defer { peer.link = nil }
            return peer.link
        }
        link?.retire()
    }

    /// Forgets `link` as `peer`'s current one and retires it.
    private func drop(_ link: AscendLink, of peer: Peer) {
        state.locked { if peer.link === link { peer.link = nil } }
        link.retire()
    }

    /// Whether a location is this engine's NPU (true), host memory (false), or another NPU (refused).
    private func isOwnDevice(_ location: String) throws(PluginFailure) -> Bool {
        guard location.hasPrefix("npu:") else { return false }
        guard location == "npu:\(options.device)" else { throw .invalid("\(location): this engine drives npu:\(options.device) (device_name)") }
        return true
    }

    /// The peer's current link, opening one when it has none or an outdated one. Connecting
    /// happens outside the state lock; of two racing connects, one link is kept.
    private func link(for peer: Peer) throws(PluginFailure) -> AscendLink {
        let (current, snapshot, wanted, recentFailure) = state.locked { () -> (AscendLink?, [(UInt64, LocalBuffer)], UInt64, PluginFailure?) in
            let recent = peer.failedAt != 0 && monotonicNanoseconds() - peer.failedAt < AscendInstance.retryPause ? peer.failure : nil
            return (peer.link, buffers.map { ($0.key, $0.value.local) }, generation, recent)
        }
        if let current, current.generation == wanted, current.usable { return current }
        if let current { drop(current, of: peer) }
        if let recentFailure { throw recentFailure }
        guard let (local, remote) = peer.info.pair(with: endpoints, localHostIP: options.hostIP) else {
            throw .unreachable("no endpoint in common with the peer")
        }
        let fresh: AscendLink
        do {
            fresh = try AscendLink(local: local, remote: remote, server: (peer.info.serverIP, peer.info.serverPort),
                                   buffers: snapshot, generation: wanted, options: options)
        } catch {
            state.locked { (peer.failedAt, peer.failure) = (monotonicNanoseconds(), error) }
            throw error
        }
        // Kept only if the peer is still open and no buffer changed while connecting.
        let kept = state.locked { () -> AscendLink? in
            guard !peer.closed, fresh.generation == generation else { return nil }
            if let other = peer.link, other.generation == generation, other.usable { return other }
            peer.link = fresh
            peer.failedAt = 0
            return fresh
        }
        if kept !== fresh { fresh.retire() }
        guard let kept else { throw PluginFailure(TE_ERR_AGAIN, "the peer was closed or local buffers changed while connecting") }
        return kept
    }

    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        var i = 0
        var reconnected = false
        while i < requests.count {
            // One HIXL batch per run of requests with the same peer and direction.
            let first = requests[i]
            guard first.opcode == TE_OP_READ || first.opcode == TE_OP_WRITE,
                  let peer = state.locked({ peers[first.peer] }) else {
                throw .invalid("bad request (opcode \(first.opcode), peer \(first.peer))")
            }
            let link = try link(for: peer)
            var remote: [UInt64] = [], local: [UInt64] = [], lengths: [UInt64] = [], carried: [(cookie: UInt64, length: UInt64)] = []
            var j = i
            while j < requests.count, remote.count < 4096 {
                let request = requests[j]
                guard request.peer == first.peer, request.opcode == first.opcode else { break }
                guard request.length > 0 else { throw .invalid("request of 0 bytes") }
                guard link.serves(request.remote_addr, request.length) else {
                    guard j == i else { break }
                    // The server may have registered it after this link connected: ask once more.
                    if !reconnected { reconnected = true; drop(link, of: peer); break }
                    throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is not inside a buffer the peer's HIXL server registered")
                }
                remote.append(request.remote_addr)
                local.append(request.local_addr)
                lengths.append(request.length)
                carried.append((request.cookie, request.length))
                j += 1
            }
            if remote.isEmpty { continue }  // the link was dropped to ask the server again
            guard state.locked({ () -> Bool in
                guard unfinished < AscendInstance.maxBatches else { return false }
                unfinished += 1
                return true
            }) else { throw PluginFailure(TE_ERR_AGAIN, "\(AscendInstance.maxBatches) batches in flight") }
            let posted: UnsafeMutableRawPointer?
            do { posted = try link.post(write: first.opcode == TE_OP_WRITE, remote: remote, local: local, lengths: lengths) } catch {
                drop(link, of: peer)
                state.locked { unfinished -= 1 }
                throw error
            }
            guard let complete = posted else {
                state.locked { unfinished -= 1 }
                continue  // retired meanwhile: the next round opens a new link
            }
            let deadline = monotonicNanoseconds() + options.transferTimeoutMs * 1_000_000
            state.locked { batches.append(Batch(link: link, complete: complete, requests: carried, deadline: deadline)) }
            i = j
            accepted = j
        }
    }

    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        let (sum, overflow) = monotonicNanoseconds().addingReportingOverflow(timeout)
        let deadline = overflow ? UInt64.max : sum
        var pause: UInt32 = 10
        while true {
            _ = reaping.tryLocked { reap() }
            let n = finished.locked { done.drain(into: out) }
            let now = monotonicNanoseconds()
            if n > 0 || now >= deadline { return n }
            // HIXL offers no completion event to block on: back off from 10 us to 1 ms.
            usleep(UInt32(min(UInt64(pause), (deadline - now) / 1000 + 1)))
            pause = min(pause * 2, 1000)
        }
    }

    /// Queries every batch in flight once and moves the finished ones' requests to `done`.
    private func reap() {
        let current = state.locked { () -> [Batch] in defer { batches.removeAll() }; return batches }
        guard !current.isEmpty else { return }
        var waiting: [Batch] = []
        var finishedNow: [(Batch, Int32)] = []
        let now = monotonicNanoseconds()
        for batch in current {
            switch batch.link.query(batch.complete) {
            case ASCEND_WAITING:
                if now < batch.deadline { waiting.append(batch); continue }
                // HIXL leaves a stuck batch to the caller: fail it and rebuild the link.
                host.log(TE_LOG_WARNING, "ascend plugin: a batch of \(batch.requests.count) request(s) did not finish within \(options.transferTimeoutMs) ms (MC_ASCEND_TRANSFER_TIMEOUT_MS); its link is rebuilt")
                state.locked { for peer in peers.values where peer.link === batch.link { peer.link = nil } }
                batch.link.retire(abandon: true)
                finishedNow.append((batch, TE_ERR_TIMEOUT))
            case ASCEND_COMPLETED: finishedNow.append((batch, TE_OK))
            default: finishedNow.append((batch, TE_ERR_IO))
            }
        }
        state.locked {
            batches.insert(contentsOf: waiting, at: 0)
            unfinished -= finishedNow.count
        }
        guard !finishedNow.isEmpty else { return }
        finished.locked {
            for (batch, status) in finishedNow {
                for request in batch.requests { done.complete(request.cookie, status: status, bytes: status == TE_OK ? request.length : 0) }
            }
        }
    }

    /// NPU memory (`npu:N`) from aclrtMalloc; host locations keep the host's allocator.
    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        guard try isOwnDevice(location) else { throw .notSupported("\(location) is not NPU memory") }
        var address: UInt64 = 0
        var status = ascend_set_device(options.device)
        if status == 0 { status = ascend_malloc(length, &address) }
        guard status == 0, address != 0 else { throw .noResources(cannFailure("aclrtMalloc(\(length) bytes on npu:\(options.device))", status)) }
        state.locked { _ = allocations.insert(address) }
        return address
    }

    func free(address: UInt64) throws(PluginFailure) {
        guard state.locked({ allocations.remove(address) }) != nil else {
            throw .invalid("0x\(String(address, radix: 16)) was not allocated by this plugin")
        }
        _ = ascend_free(address)
    }

    func close() {
        let (links, memories) = state.locked { () -> ([AscendLink], [UnsafeMutableRawPointer]) in
            defer { peers.removeAll(); buffers.removeAll(); batches.removeAll() }
            return (peers.values.compactMap(\.link) + batches.map(\.link), buffers.values.map(\.memory))
        }
        for link in links { link.retire(abandon: true) }
        guard let server else { return }
        for memory in memories { _ = ascend_server_unregister(server, memory) }
        _ = ascend_server_destroy(server)
        self.server = nil
        for address in state.locked({ allocations }) { _ = ascend_free(address) }
    }
}
