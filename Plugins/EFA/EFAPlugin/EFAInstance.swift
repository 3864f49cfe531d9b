import CEFAShim
import CTransportABI
import TransportPluginKit
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One plugin instance: the opened devices, registrations, peers and the
/// requests in flight.
final class EFAInstance: TransportInstance, @unchecked Sendable {
    /// A local registration: one memory region per device.
    struct Registration {
        var address: UInt64
        var length: UInt64
        var regions: [UnsafeMutableRawPointer?]
        var keys: [UInt64]
        var descriptors: [UnsafeMutableRawPointer?]
    }
    /// A buffer the peer published, with its key on each of the peer's devices.
    struct RemoteBuffer {
        var address: UInt64
        var length: UInt64
        var keys: [UInt64]
    }
    /// An opened peer: for each local device, the peer device it talks to and its address handle.
    struct Peer {
        var name: String
        var buffers: [RemoteBuffer]
        var peerDevice: [Int]
        var addressHandle: [UInt64]
    }
    let options: EFAOptions
    private(set) var contexts: [DeviceContext] = []
    let host: HostServices
    let signal = Signal()
    private var peers: [UInt64: Peer] = [:]
    private var nextPeer: UInt64 = 1
    private var registrations: [Registration] = []
    private var parents = PartedRequests()
    private var done = CompletionQueue()
    private var queuedParts = 0
    private var nextKey: UInt64 = 1
    private var nextDevice = 0
    /// Peer addresses already in each device's address vector (hex -> handle), bounded.
    private var knownAddresses: [AddressBook] = []
    /// Parts allowed in flight or waiting before submit answers TE_ERR_AGAIN.
    private let maxQueuedParts = 65_536
    /// The smallest max message size of the devices: larger pieces are split.
    private(set) var partSize: UInt64 = .max
    /// The connection probes openPeer waits for (guarded by `signal`).
    var probes = ConnectionProbes()
    /// Per device, the registered byte a probe reads into (nil where it could not be registered).
    var probeTargets: [ProbeTarget?] = []

    init(options: EFAOptions, host: HostServices) {
        self.options = options
        self.host = host
    }

    /// Opens every chosen domain. Throws a sentence on failure.
    func open(domains: [efa_domain_info]) throws(LibfabricFailure) {
        for (index, domain) in domains.enumerated() {
            var handle: OpaquePointer?
            var error = [CChar](repeating: 0, count: 256)
            let status = efa_open(options.provider, options.node, domain.domainName, &handle, &error, error.count)
            guard status == 0, let handle else {
                close()
                throw LibfabricFailure(code: status, text: "\(domain.domainName): \(String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
            }
            let context = DeviceContext(index: index, handle: handle, maxOutstanding: options.maxOutstanding,
                                        spinNanoseconds: options.spinNanoseconds,
                                        timeoutNanoseconds: options.timeoutNanoseconds) { [unowned self] in finished($0) }
            contexts.append(context)
            guard context.start() else {
                close()
                throw LibfabricFailure(code: -Int32(EAGAIN), text: "cannot start the progress thread for \(domain.domainName)")
            }
            partSize = min(partSize, max(4096, context.info.max_msg_size))
        }
        if options.sliceSize > 0 { partSize = min(partSize, options.sliceSize) }
        probeTargets = contexts.map { registerProbeTarget(on: $0) }
        knownAddresses = Array(repeating: AddressBook(capacity: options.maxAddresses), count: contexts.count)
    }

    /// Stops every device; registrations are released first.
    func close() {
        let regions = signal.locked { () -> [Registration] in
            defer { registrations.removeAll() }
            return registrations
        }
        for registration in regions { for region in registration.regions { _ = efa_mr_close(region) } }
        // Memory regions go before the domains they belong to; the probe bytes' memory only once
        // the endpoints are closed (a probe given up on may still be answered until then).
        for target in probeTargets { target?.closeRegion() }
        for context in contexts { context.close() }
        contexts.removeAll()
        for target in probeTargets { target?.memory.deallocate() }
        probeTargets.removeAll()
    }

    func log(_ level: Int32, _ text: String) { host.log(level, text) }

    // MARK: Descriptor

    /// The NIC path of a local device, as upstream spells it.
    func nicPath(_ context: DeviceContext) -> String { "\(options.segmentName)@\(context.name)" }

    /// The endpoint address of a local device, hex-encoded as upstream's `efa_addr`.
    func endpointAddress(_ context: DeviceContext) -> String {
        var bytes = [UInt8](repeating: 0, count: 256)
        var length = bytes.count
        guard efa_get_name(context.handle, &bytes, &length) == 0 else { return "" }
        return JSONFragment.hex(Array(bytes.prefix(length)))
    }

    /// Per opened domain: bytes of completed parts each way, bytes posted and not finished,
    /// failed posts, completions and timeouts.
    func stats() -> String? { DeviceCounters.report(contexts.map(\.counters)) }

    /// `devices` and `priority_matrix` in upstream's RDMA-family layout, plus what only this plugin reads.
    func localDescriptor() -> String {
        let devices = contexts.map { "{\"name\":\(JSONFragment.string($0.name)),\"lid\":0,\"gid\":\"\"}" }.joined(separator: ",")
        let names = contexts.map { JSONFragment.string($0.name) }.joined(separator: ",")
        let provider = contexts.first?.info.providerName ?? options.provider
        return "{\"devices\":[\(devices)],\"priority_matrix\":{\"cpu:0\":[[\(names)],[]],\"*\":[[\(names)],[]]},"
            + "\"efa_provider\":\(JSONFragment.string(provider))}"
    }

    // MARK: Memory

    /// Registers a buffer on every device; returns its descriptor fragment.
    func register(address: UInt64, length: UInt64, location: String) throws(PluginFailure) -> String {
        var registration = Registration(address: address, length: length, regions: [], keys: [], descriptors: [])
        for context in contexts {
            let key = newKey()
            var region: UnsafeMutableRawPointer?, descriptor: UnsafeMutableRawPointer?, actualKey: UInt64 = 0
            let status = efa_mr_reg(context.handle, UnsafeMutableRawPointer(bitPattern: UInt(address)), Int(length), key,
                                    &region, &actualKey, &descriptor)
            guard status == 0 else {
                for region in registration.regions { _ = efa_mr_close(region) }
                throw .noResources("fi_mr_reg of \(length) bytes at 0x\(String(address, radix: 16)) on \(context.name): \(LibfabricError(code: status))")
            }
            registration.regions.append(region)
            registration.keys.append(actualKey)
            registration.descriptors.append(descriptor)
        }
        signal.locked {
            registrations.removeAll { $0.address == address }
            let index = registrations.firstIndex { $0.address > address } ?? registrations.count
            registrations.insert(registration, at: index)
        }
        let keys = registration.keys.map(String.init).joined(separator: ",")
        return "{\"rkey\":[\(keys)],\"lkey\":[\(keys)]}"
    }

    /// A memory-region key not used before on this instance.
    func newKey() -> UInt64 { signal.locked { () -> UInt64 in defer { nextKey += 1 }; return nextKey } }

    /// Closes a buffer's memory regions.
    func unregister(address: UInt64) throws(PluginFailure) {
        let removed = signal.locked { () -> Registration? in
            guard let index = registrations.firstIndex(where: { $0.address == address }) else { return nil }
            return registrations.remove(at: index)
        }
        guard let removed else { throw .invalid("no registration starts at 0x\(String(address, radix: 16))") }
        for region in removed.regions { _ = efa_mr_close(region) }
    }

    // MARK: Peers

    private struct PeerDescriptor: Decodable {
        struct Device: Decodable { var name: String }
        struct Buffer: Decodable {
            var addr: UInt64
            var length: UInt64
            var rkey: [UInt64]?
        }
        var devices: [Device]?
        var buffers: [Buffer]?
    }

    /// Upstream's HandShakeDesc, the fields this transport uses.
    struct Handshake: Decodable {
        var local_nic_path: String?
        var peer_nic_path: String?
        var efa_addr: String?
        var reply_msg: String?
    }

    private func handshakeJSON(local: String, peer: String, address: String, reply: String) -> String {
        "{\"local_nic_path\":\(JSONFragment.string(local)),\"peer_nic_path\":\(JSONFragment.string(peer)),\"local_lid\":0,"
            + "\"local_gid\":\"\",\"qp_num\":[],\"efa_addr\":\(JSONFragment.string(address)),\"reply_msg\":\(JSONFragment.string(reply))}"
    }

    /// Puts a peer's address into a device's address vector once. The address comes from an
    /// unauthenticated handshake: its length must be the provider's (the shim checks), and the
    /// vector stays bounded (the oldest address that no open peer uses and nobody used in the last
    /// two seconds makes room). Lookup, eviction and insertion happen under one lock, the domain's own
    /// (FI_THREAD_DOMAIN) taken inside it, so concurrent handshakes cannot race.
    private func insertAddress(_ text: String, into context: DeviceContext) -> Result<UInt64, LibfabricFailure> {
        let hex = text.lowercased()
        guard let bytes = JSONFragment.unhex(hex), !bytes.isEmpty else {
            return .failure(LibfabricFailure(code: 0, text: "malformed efa_addr '\(text.prefix(80))'"))
        }
        let now = monotonicNanoseconds()
        return signal.locked {
            if let known = knownAddresses[context.index].handle(of: hex, now: now) { return .success(known) }
            // An open peer holds one handle per local device, in device order.
            let inUse = Set(peers.values.compactMap { $0.addressHandle.indices.contains(context.index) ? $0.addressHandle[context.index] : nil })
            guard let evict = knownAddresses[context.index].makeRoom(keeping: inUse, now: now) else {
                return .failure(LibfabricFailure(code: 0, text: "the address vector of \(context.name) is full (\(options.maxAddresses) peers in use; MC_EFA_MAX_ADDRESSES)"))
            }
            var handle: UInt64 = 0
            let status = context.serialized { () -> Int32 in
                for old in evict { _ = efa_av_remove(context.handle, old) }
                return efa_av_insert(context.handle, bytes, bytes.count, &handle)
            }
            guard status == 0 else {
                return .failure(LibfabricFailure(code: status, text: "fi_av_insert of a \(bytes.count)-byte efa_addr on \(context.name): \(LibfabricError(code: status))"))
            }
            knownAddresses[context.index].insert(hex, handle: handle, now: now)
            return .success(handle)
        }
    }

    /// Opens a peer: one Connection handshake per local device (upstream's address exchange).
    func openPeer(segment: String, descriptor descriptorJSON: String) throws(PluginFailure) -> UInt64 {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(descriptorJSON.utf8)) else {
            throw .invalid("\(segment): malformed segment descriptor")
        }
        let devices = descriptor.devices ?? []
        guard !devices.isEmpty else { throw .unreachable("\(segment) publishes no efa devices") }
        var buffers: [RemoteBuffer] = []
        for buffer in descriptor.buffers ?? [] {
            guard let keys = buffer.rkey, keys.count == devices.count else {
                throw .invalid("\(segment): buffer at 0x\(String(buffer.addr, radix: 16)) has \(buffer.rkey?.count ?? 0) rkeys for \(devices.count) devices")
            }
            buffers.append(RemoteBuffer(address: buffer.addr, length: buffer.length, keys: keys))
        }
        var peer = Peer(name: segment, buffers: buffers, peerDevice: [], addressHandle: [])
        for context in contexts {
            let target = context.index % devices.count
            let request = handshakeJSON(local: nicPath(context), peer: "\(segment)@\(devices[target].name)",
                                        address: endpointAddress(context), reply: "")
            let replyText: String
            do { replyText = try host.handshake(peer: segment, request: request) } catch {
                throw .unreachable("handshake with \(segment) for \(context.name) failed: \(error.message)")
            }
            guard let answer = try? JSONDecoder().decode(Handshake.self, from: Data(replyText.utf8)) else {
                throw .rejected("\(segment) answered the handshake with malformed JSON")
            }
            if let message = answer.reply_msg, !message.isEmpty { throw .rejected("\(segment) rejected the handshake: \(message)") }
            guard let address = answer.efa_addr, !address.isEmpty else {
                throw .unreachable("\(segment) did not send an efa_addr (does it run the efa transport?)")
            }
            switch insertAddress(address, into: context) {
            case .success(let handle):
                peer.peerDevice.append(target)
                peer.addressHandle.append(handle)
            case .failure(let failure):
                throw .unreachable("\(segment): \(failure.text)")
            }
        }
        // Recorded first, so its address handles count as in use while the probe waits.
        let handle = signal.locked { () -> UInt64 in
            defer { nextPeer += 1 }
            peers[nextPeer] = peer
            return nextPeer
        }
        probeConnections(peer)
        return handle
    }

    /// Forgets a peer (its address-vector entries stay for a later reopen).
    func closePeer(_ handle: UInt64) {
        signal.locked { _ = peers.removeValue(forKey: handle) }
    }

    /// Answers a peer's Connection handshake with this device's address.
    func answerHandshake(_ json: String) -> String {
        guard let request = try? JSONDecoder().decode(Handshake.self, from: Data(json.utf8)) else {
            return handshakeJSON(local: "", peer: "", address: "", reply: "malformed handshake")
        }
        let wanted = request.peer_nic_path ?? ""
        let deviceName = wanted.split(separator: "@").last.map(String.init) ?? ""
        guard let context = contexts.first(where: { $0.name == deviceName }) ?? (wanted.isEmpty ? contexts.first : nil) else {
            return handshakeJSON(local: "", peer: request.local_nic_path ?? "", address: "", reply: "EFA nic path inconsistency: no device '\(deviceName)' here")
        }
        if let address = request.efa_addr, !address.isEmpty, case .failure(let failure) = insertAddress(address, into: context) {
            return handshakeJSON(local: nicPath(context), peer: request.local_nic_path ?? "", address: "", reply: failure.text)
        }
        return handshakeJSON(local: nicPath(context), peer: request.local_nic_path ?? "", address: endpointAddress(context), reply: "")
    }

    // MARK: Data path

    /// Validates and queues requests; never blocks.
    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        guard !contexts.isEmpty else { throw PluginFailure(TE_ERR_INTERNAL, "no device is open") }
        var perContext = [[Part]](repeating: [], count: contexts.count)
        // What was accepted goes to the devices, also when a later request is refused.
        defer { for (index, parts) in perContext.enumerated() where !parts.isEmpty { contexts[index].enqueue(parts) } }
        let now = monotonicNanoseconds()
        try signal.locked { () throws(PluginFailure) in
            for (i, request) in requests.enumerated() {
                guard queuedParts < maxQueuedParts else { throw PluginFailure(TE_ERR_AGAIN, "\(maxQueuedParts) parts are queued; poll, then submit the rest") }
                guard let peer = peers[request.peer] else { throw .invalid("unknown peer handle \(request.peer)") }
                guard request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE, request.length > 0 else {
                    throw .invalid("bad request (opcode \(request.opcode), length \(request.length))")
                }
                // Only inside one buffer the peer published: the same rule as every transport.
                guard let remote = peer.buffers.first(where: { contains($0.address, $0.length, request.remote_addr, request.length) }) else {
                    throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is outside \(peer.name)'s buffers")
                }
                let local = registrations.last { contains($0.address, $0.length, request.local_addr, request.length) }
                if local == nil, contexts.contains(where: { $0.needsLocalDescriptor }) {
                    throw .outOfRange("local range [0x\(String(request.local_addr, radix: 16)), +\(request.length)) is not registered (the provider needs FI_MR_LOCAL)")
                }
                let parentID = parents.newID()
                var offset: UInt64 = 0
                var pieces = 0
                while offset < request.length {
                    let length = min(partSize, request.length - offset)
                    let context = contexts[nextDevice % contexts.count]
                    nextDevice &+= 1
                    let index = context.index
                    let remoteAddress = request.remote_addr + offset
                    perContext[index].append(Part(
                        isWrite: request.opcode == TE_OP_WRITE, local: request.local_addr + offset, length: length,
                        descriptor: local?.descriptors[index], peer: peer.addressHandle[index],
                        remote: context.virtualAddressing ? remoteAddress : remoteAddress - remote.address,
                        key: remote.keys[peer.peerDevice[index]], parent: parentID, queuedAt: now))
                    offset += length
                    pieces += 1
                }
                parents.open(parentID, cookie: request.cookie, parts: pieces)
                queuedParts += pieces
                accepted = i + 1
            }
        }
    }

    private func contains(_ base: UInt64, _ length: UInt64, _ address: UInt64, _ size: UInt64) -> Bool {
        address >= base && address - base <= length && size <= length - (address - base)
    }

    /// Called by the devices with finished parts.
    private func finished(_ parts: [FinishedPart]) {
        signal.locked {
            for part in parts {
                if ConnectionProbes.isProbe(part.parent) {
                    probes.ended(part.parent, status: part.status)
                    continue
                }
                queuedParts -= 1
                if part.status != TE_OK, let error = part.error { log(TE_LOG_DEBUG, "efa plugin: \(error)") }
                if let completion = parents.partEnded(part.parent, status: part.status, bytes: part.bytes) { done.append(completion) }
            }
            signal.broadcast()
        }
    }

    /// Hands out finished requests, waiting at most `timeout` for the first.
    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        // Reap on this thread first: a synchronous caller then needs no hand-off from the progress thread.
        if signal.locked({ done.isEmpty }) { for context in contexts { context.tryProgress() } }
        return signal.locked {
            if done.isEmpty && timeout > 0 { signal.wait(nanoseconds: timeout) }
            return done.drain(into: out)
        }
    }
}

/// A libfabric failure with a sentence.
struct LibfabricFailure: Error {
    var code: Int32
    var text: String
}
