import CRDMAShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Connection handshakes (upstream's HandShakeDesc), establishing endpoints, and opening peers.

extension RDMAInstance {
    // MARK: Handshake

    /// Upstream's HandShakeDesc, the fields this transport uses.
    struct Handshake: Decodable {
        var local_nic_path: String?
        var peer_nic_path: String?
        var local_lid: UInt16?
        var local_gid: String?
        var qp_num: [UInt32]?
        var reply_msg: String?
    }

    private func handshakeJSON(local: String, peer: String, device: RDMADevice?, queuePairs: [UInt32], reply: String) -> String {
        let lid = device?.discovered.info.lid ?? 0
        let gid = device.map { GIDText.gid($0.gidBytes) } ?? ""
        return "{\"local_nic_path\":\(JSONFragment.string(local)),\"peer_nic_path\":\(JSONFragment.string(peer)),\"local_lid\":\(lid),"
            + "\"local_gid\":\(JSONFragment.string(gid)),\"qp_num\":[\(queuePairs.map(String.init).joined(separator: ","))],"
            + "\"reply_msg\":\(JSONFragment.string(reply))}"
    }

    /// Sends a Connection handshake through the host and returns the peer's answer.
    private func sendHandshake(to segment: String, _ request: String) -> Result<Handshake, FailureText> {
        let text: String
        do { text = try host.handshake(peer: segment, request: request) } catch { return .failure(FailureText(error.message)) }
        guard let answer = try? JSONDecoder().decode(Handshake.self, from: Data(text.utf8)) else {
            return .failure(FailureText("\(segment) answered the handshake with malformed JSON"))
        }
        return .success(answer)
    }

    /// Builds and connects a fresh endpoint from `device` to `peerPath` (active side).
    func establish(_ device: RDMADevice, peerSegment: String, peerPath: String) -> Result<Endpoint, FailureText> {
        let endpoint: Endpoint
        switch device.makeEndpoint() {
        case .success(let made): endpoint = made
        case .failure(let error): return .failure(FailureText("ibv_create_qp on \(device.name): \(error.text)"))
        }
        let request = handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: endpoint.queuePairNumbers, reply: "")
        let answer: Handshake
        switch sendHandshake(to: peerSegment, request) {
        case .success(let reply): answer = reply
        case .failure(let failure): endpoint.destroy(); return .failure(failure)
        }
        if let message = answer.reply_msg, !message.isEmpty {
            endpoint.destroy()
            if message == Self.simultaneousOpen { return .failure(FailureText(message, simultaneousOpen: true)) }
            return .failure(FailureText("\(peerSegment) rejected the handshake: \(message)"))
        }
        guard answer.local_nic_path == peerPath, answer.peer_nic_path == nicPath(device) else {
            endpoint.destroy()
            return .failure(FailureText("\(peerSegment) answered for \(answer.local_nic_path ?? "?") -> \(answer.peer_nic_path ?? "?"), expected \(peerPath) -> \(nicPath(device))"))
        }
        guard let queuePairs = answer.qp_num, queuePairs.count == endpoint.queuePairs.count else {
            endpoint.destroy()
            return .failure(FailureText("QP count mismatch: \(answer.qp_num?.count ?? 0) from \(peerSegment), \(endpoint.queuePairs.count) here"))
        }
        guard let gid = answer.local_gid.flatMap(GIDText.parseGID) else { endpoint.destroy(); return .failure(FailureText("\(peerSegment) sent no valid local_gid")) }
        let status = device.connect(endpoint, peerQueuePairs: queuePairs, peerLID: answer.local_lid ?? 0, peerGID: gid)
        guard status == 0 else { endpoint.destroy(); return .failure(FailureText("ibv_modify_qp to RTS on \(device.name): \(String(cString: strerror(-status)))")) }
        return .success(endpoint)
    }

    /// Passive side: a peer asks one of our devices to connect to its QPs.
    func answerHandshake(_ json: String) -> String {
        guard let request = try? JSONDecoder().decode(Handshake.self, from: Data(json.utf8)) else {
            return handshakeJSON(local: "", peer: "", device: nil, queuePairs: [], reply: "malformed handshake")
        }
        let peerPath = request.local_nic_path ?? ""
        let wanted = request.peer_nic_path ?? ""
        let deviceName = wanted.split(separator: "@").last.map(String.init) ?? ""
        guard let device = devices.first(where: { $0.name == deviceName }) else {
            return handshakeJSON(local: wanted, peer: peerPath, device: nil, queuePairs: [], reply: "no device '\(deviceName)' here")
        }
        guard let queuePairs = request.qp_num, !queuePairs.isEmpty, let gid = request.local_gid.flatMap(GIDText.parseGID),
              peerPath.contains("@") else {
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "incomplete handshake (qp_num, local_gid, local_nic_path)")
        }
        // Both sides opening each other at once: the lower NIC path's own handshake wins, this one
        // is refused, and its sender uses the endpoint the winner's handshake builds there.
        if nicPath(device) < peerPath && device.lock.locked({ device.connecting.contains(peerPath) }) {
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: Self.simultaneousOpen)
        }
        let endpoint: Endpoint
        switch device.makeEndpoint() {
        case .success(let made): endpoint = made
        case .failure(let error):
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "ibv_create_qp: \(error.text)")
        }
        guard queuePairs.count == endpoint.queuePairs.count else {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "QP count mismatch (\(queuePairs.count) vs \(endpoint.queuePairs.count); set MC_NUM_QP_PER_EP alike)")
        }
        let status = device.connect(endpoint, peerQueuePairs: queuePairs, peerLID: request.local_lid ?? 0, peerGID: gid)
        guard status == 0 else {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: "ibv_modify_qp: \(String(cString: strerror(-status)))")
        }
        let peerSegment = String(peerPath[..<peerPath.lastIndex(of: "@")!])
        if case .failure(let refusal) = device.register(Connection(peerNicPath: peerPath, peerSegment: peerSegment, peerDevice: 0, endpoint: endpoint)) {
            endpoint.destroy()
            return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: [], reply: refusal.text)
        }
        return handshakeJSON(local: nicPath(device), peer: peerPath, device: device, queuePairs: endpoint.queuePairNumbers, reply: "")
    }

    // MARK: Peers

    private struct PeerDescriptor: Decodable {
        struct Device: Decodable {
            var name: String
            var lid: UInt16?
            var gid: String?
        }
        struct Buffer: Decodable {
            var name: String?
            var addr: UInt64
            var length: UInt64
            var rkey: [UInt32]?
        }
        var devices: [Device]?
        var buffers: [Buffer]?
    }

    /// Opens a peer: one connection per local device, to the peer device with the same name if there
    /// is one, else to the peer's device at the same position.
    func openPeer(segment: String, descriptor descriptorJSON: String) throws(PluginFailure) -> UInt64 {
        guard let descriptor = try? JSONDecoder().decode(PeerDescriptor.self, from: Data(descriptorJSON.utf8)) else {
            throw .invalid("\(segment): malformed segment descriptor")
        }
        let peerDevices = (descriptor.devices ?? []).map { PeerDevice(name: $0.name, lid: $0.lid ?? 0, gid: $0.gid.flatMap(GIDText.parseGID) ?? []) }
        guard !peerDevices.isEmpty else { throw .unreachable("\(segment) publishes no RDMA devices") }
        var buffers: [RemoteBuffer] = []
        for buffer in descriptor.buffers ?? [] {
            guard let keys = buffer.rkey, keys.count == peerDevices.count else {
                throw .invalid("\(segment): buffer at 0x\(String(buffer.addr, radix: 16)) has \(buffer.rkey?.count ?? 0) rkeys for \(peerDevices.count) devices")
            }
            buffers.append(RemoteBuffer(address: buffer.addr, length: buffer.length, location: buffer.name ?? "*", rkeys: keys))
        }
        var connections: [Connection] = []
        for device in devices {
            let target = peerDevices.firstIndex { $0.name == device.name } ?? device.index % peerDevices.count
            let peerPath = "\(segment)@\(peerDevices[target].name)"
            let opened = device.establishing(peerPath, waitNanoseconds: Self.establishWaitNanoseconds, reuse: { existing in
                !existing.current.broken && existing.peerDevice == target && !existing.stale.load(ordering: .acquiring)
            }) {
                let before = device.lock.locked { device.connections[peerPath]?.current }
                switch establish(device, peerSegment: segment, peerPath: peerPath) {
                case .success(let endpoint):
                    let registered = device.register(Connection(peerNicPath: peerPath, peerSegment: segment, peerDevice: target, endpoint: endpoint))
                    switch registered {
                    case .success(let connection): connection.stale.store(false, ordering: .releasing)
                    case .failure: endpoint.destroy()
                    }
                    return registered
                case .failure(let failure) where failure.simultaneousOpen:
                    return device.awaitPassive(peerPath, replacing: before, peerDevice: target, nanoseconds: Self.establishWaitNanoseconds)
                case .failure(let failure):
                    return .failure(failure)
                }
            }
            switch opened {
            case .success(let connection):
                connection.users.add(1, ordering: .relaxed)
                connections.append(connection)
            case .failure(let failure):
                throw .unreachable(failure.text)
            }
        }
        let peer = Peer(name: segment, buffers: buffers, devices: peerDevices, connections: connections)
        let handle = signal.locked { () -> UInt64 in
            defer { nextPeer += 1 }
            peers[nextPeer] = peer
            return nextPeer
        }
        return handle
    }

    /// How long an open_peer or a repair waits for another one establishing the same path.
    static let establishWaitNanoseconds: UInt64 = 30_000_000_000
    /// The reply_msg refusing a handshake because this side's own, to the same path, goes first.
    static let simultaneousOpen = "simultaneous open: this side's handshake to you goes first; use the endpoint it builds"

    /// Forgets a peer; a connection no open peer uses any more is reconnected by the next open_peer.
    func closePeer(_ handle: UInt64) {
        guard let peer = signal.locked({ peers.removeValue(forKey: handle) }) else { return }
        for connection in peer.connections where connection.users.subtract(1, ordering: .relaxed).newValue <= 0 {
            connection.stale.store(true, ordering: .releasing)
        }
    }
}
