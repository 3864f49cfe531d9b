import CEFAShim
import CTransportABI
import TransportPluginKit

/// The connection probes of openPeer: ids (their bit 63 set, so they never meet a request's
/// parent id, which counts up from 1) and the status of the probes someone still waits for.
struct ConnectionProbes {
    private static let bit: UInt64 = 1 << 63
    private var next: UInt64 = 0
    private var waiting: Set<UInt64> = []
    private var ended: [UInt64: Int32] = [:]

    static func isProbe(_ parent: UInt64) -> Bool { parent & bit != 0 }

    /// A new probe id, waited for until `finish`.
    mutating func start() -> UInt64 {
        next &+= 1
        let id = Self.bit | (next & ~Self.bit)
        waiting.insert(id)
        return id
    }

    /// Records how a probe ended; one nobody waits for any more is dropped.
    mutating func ended(_ id: UInt64, status: Int32) {
        if waiting.contains(id) { ended[id] = status }
    }

    func status(_ id: UInt64) -> Int32? { ended[id] }

    /// Stops waiting for `ids`; returns how each ended (nil: no answer yet).
    mutating func finish(_ ids: [UInt64]) -> [Int32?] {
        defer { for id in ids { waiting.remove(id); ended.removeValue(forKey: id) } }
        return ids.map { ended[$0] }
    }
}

/// One registered byte per device that a probe reads into (a provider with FI_MR_LOCAL needs a
/// registered local buffer even for one byte).
final class ProbeTarget: @unchecked Sendable {
    let memory = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    var region: UnsafeMutableRawPointer?
    var descriptor: UnsafeMutableRawPointer?

    /// Closes the memory region (the memory itself is freed by the owner, after the endpoint).
    func closeRegion() {
        if let region { _ = efa_mr_close(region) }
        region = nil
    }
}

extension EFAInstance {
    /// Registers a device's probe byte; nil (no probes on that device) when it cannot.
    func registerProbeTarget(on context: DeviceContext) -> ProbeTarget? {
        let target = ProbeTarget()
        var key: UInt64 = 0
        guard efa_mr_reg(context.handle, target.memory, 64, newKey(), &target.region, &key, &target.descriptor) == 0 else {
            target.memory.deallocate()
            return nil
        }
        return target
    }

    /// Has each device's provider set up its connection to the peer now rather than on the first
    /// transfer (ofi_rxm connects on the first operation): a 1-byte read of the peer's first
    /// non-empty buffer per device into that device's probe byte, waited for up to 2 s. Not
    /// counted in the device figures; a probe that fails is logged, not fatal (the transfers
    /// report real errors). A peer that publishes no buffer is not probed.
    func probeConnections(_ peer: Peer) {
        guard let buffer = peer.buffers.first(where: { $0.length > 0 }) else { return }
        let started = monotonicNanoseconds()
        var ids: [UInt64] = []
        for (index, context) in contexts.enumerated() {
            guard index < probeTargets.count, let target = probeTargets[index] else { continue }
            let id = signal.locked { probes.start() }
            ids.append(id)
            context.enqueue([Part(isWrite: false, local: UInt64(UInt(bitPattern: target.memory)), length: 1,
                                  descriptor: target.descriptor, peer: peer.addressHandle[index],
                                  remote: context.virtualAddressing ? buffer.address : 0, key: buffer.keys[peer.peerDevice[index]],
                                  parent: id, queuedAt: started, isProbe: true)])
        }
        guard !ids.isEmpty else { return }
        let deadline = started + 2_000_000_000
        let statuses = signal.locked { () -> [Int32?] in
            while ids.contains(where: { probes.status($0) == nil }) {
                let now = monotonicNanoseconds()
                if now >= deadline { break }
                signal.wait(nanoseconds: deadline - now)
            }
            return probes.finish(ids)
        }
        if statuses.contains(where: { $0 != TE_OK }) {
            log(TE_LOG_INFO, "efa plugin: the connection probe to \(peer.name) did not complete (\(statuses.map { $0.map(String.init) ?? "no answer in 2 s" })); its first transfer connects instead")
        }
    }
}
