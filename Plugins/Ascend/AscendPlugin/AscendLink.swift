import CAscendShim
import CTransportABI
import AscendRankInfo
import TransportPluginKit

// One HIXL client: a link from this engine to one peer's HIXL server. HIXL wants
// every local buffer registered with the client before it connects, and learns
// the server's buffers when it connects, so a link carries a snapshot of both;
// when either side's buffers change the link is retired and a new one opened.

/// A failed CANN call, with its status and the runtime's latest error text.
func cannFailure(_ call: String, _ status: Int32) -> String {
    let recent = String(cString: ascend_recent_error())
    let name: String
    switch UInt32(bitPattern: status) {
    case ASCEND_HIXL_PARAM_INVALID: name = "HIXL_PARAM_INVALID"
    case ASCEND_HIXL_TIMEOUT: name = "HIXL_TIMEOUT"
    case ASCEND_HIXL_FAILED: name = "HIXL_FAILED"
    default: name = "status \(status)"
    }
    return "\(call): \(name)\(recent.isEmpty ? "" : " (\(recent))")"
}

/// A local buffer as registered with HIXL.
struct LocalBuffer {
    var length: UInt64
    var device: Bool
}

/// One client link. Every call into the client happens under `use` (HIXL forbids destroying a
/// client while another call runs on it); `inFlight` counts batches not yet reaped.
final class AscendLink: @unchecked Sendable {
    let use = Signal()
    private var client: UnsafeMutableRawPointer?
    private var memories: [UnsafeMutableRawPointer] = []
    /// The server's registered ranges, as HIXL reported them at connect time.
    let remote: [(start: UInt64, size: UInt64)]
    /// The registration generation this link's snapshot belongs to.
    let generation: UInt64
    private var inFlight = 0
    private var retired = false

    /// Most ranges read from a server; more are ignored (a hostile or huge answer).
    static let maxRemoteRanges = 4096

    /// Creates, registers `buffers` with, and connects a client; blocks up to `options.connectTimeoutMs`.
    init(local: AscendEndpoint, remote peer: AscendEndpoint, server: (ip: String, port: UInt32), buffers: [(UInt64, LocalBuffer)],
         generation: UInt64, options: AscendOptions) throws(PluginFailure) {
        self.generation = generation
        var handle: UnsafeMutableRawPointer?
        var l = local.shim, r = peer.shim
        var status = ascend_set_device(options.device)
        if status == 0 {
            status = ascend_client_create(&l, &r, server.ip, server.port, options.trafficClass, options.serviceLevel, nil, &handle)
        }
        guard status == 0, let handle else { throw .unreachable(cannFailure("HixlCSClientCreate to \(server.ip):\(server.port)", status)) }
        client = handle
        var failure: PluginFailure?
        for (address, buffer) in buffers {
            var memory: UnsafeMutableRawPointer?
            status = ascend_client_register(handle, "te-\(String(address, radix: 16))", buffer.device ? 1 : 0, address, buffer.length, &memory)
            guard status == 0, let memory else { failure = .noResources(cannFailure("HixlCSClientRegMem", status)); break }
            memories.append(memory)
        }
        if failure == nil {
            status = ascend_client_connect(handle, options.connectTimeoutMs)
            if status != 0 { failure = .unreachable(cannFailure("HixlCSClientConnect to \(server.ip):\(server.port)", status)) }
        }
        var ranges: [(UInt64, UInt64)] = []
        if failure == nil {
            let capacity = AscendLink.maxRemoteRanges
            var starts = [UInt64](repeating: 0, count: capacity), sizes = starts
            var count: UInt32 = 0
            status = ascend_client_remote_memory(handle, &starts, &sizes, UInt32(capacity), &count, options.connectTimeoutMs)
            if status != 0 { failure = .unreachable(cannFailure("HixlCSClientGetRemoteMem", status)) }
            let n = min(Int(count), capacity)
            ranges = (0..<n).compactMap { i in
                sizes[i] > 0 && !starts[i].addingReportingOverflow(sizes[i]).overflow ? (starts[i], sizes[i]) : nil
            }
        }
        remote = ranges
        if let failure {
            destroy()
            throw failure
        }
    }

    /// Whether the server registered [address, address + length) (overflow-safe).
    func serves(_ address: UInt64, _ length: UInt64) -> Bool {
        remote.contains { address >= $0.start && address - $0.start <= $0.size && length <= $0.size - (address - $0.start) }
    }

    /// Whether new batches may go through this link.
    var usable: Bool { use.locked { client != nil && !retired } }

    /// HIXL's "resource exhausted" (hixl_types.h): too many unfinished batches.
    static let resourceExhausted: Int32 = 203900

    /// Posts one batch; nil when the link was retired meanwhile (the caller opens a new one).
    /// A refused post retires the link: HIXL fails every later batch of a client once one failed.
    func post(write: Bool, remote: [UInt64], local: [UInt64], lengths: [UInt64]) throws(PluginFailure) -> UnsafeMutableRawPointer? {
        try use.locked { () throws(PluginFailure) -> UnsafeMutableRawPointer? in
            guard let client, !retired else { return nil }
            var complete: UnsafeMutableRawPointer?
            let status = ascend_client_batch(client, write ? 1 : 0, UInt32(remote.count), remote, local, lengths, &complete)
            guard status == 0, let complete else {
                retired = true
                if inFlight == 0 { destroyLocked() }
                let text = cannFailure(write ? "HixlCSClientBatchPutAsync" : "HixlCSClientBatchGetAsync", status)
                throw PluginFailure(status == AscendLink.resourceExhausted ? TE_ERR_AGAIN : TE_ERR_IO, text + "; the link is reopened")
            }
            inFlight += 1
            return complete
        }
    }

    /// A batch's state: ASCEND_WAITING, _COMPLETED or _FAILED (a failed query counts as failed).
    /// A finished batch is no longer in flight; the last one of a retired link destroys it.
    func query(_ complete: UnsafeMutableRawPointer) -> Int32 {
        use.locked {
            guard let client else { return ASCEND_FAILED }
            var state: Int32 = ASCEND_WAITING
            if ascend_client_query(client, complete, &state) != 0 { state = ASCEND_FAILED }
            if state != ASCEND_WAITING {
                if state != ASCEND_COMPLETED { retired = true }  // a failed client fails all later batches
                inFlight -= 1
                if retired && inFlight == 0 { destroyLocked() }
            }
            return state
        }
    }

    /// No new batches; destroyed once none is in flight (`abandon`: now, leaving HIXL's handles).
    func retire(abandon: Bool = false) {
        use.locked {
            retired = true
            if inFlight == 0 || abandon { destroyLocked() }
        }
    }

    private func destroy() { use.locked { destroyLocked() } }

    private func destroyLocked() {
        guard let handle = client else { return }
        for memory in memories { _ = ascend_client_unregister(handle, memory) }
        memories.removeAll()
        _ = ascend_client_destroy(handle)
        client = nil
    }
}

extension AscendEndpoint {
    /// The shim's plain form.
    var shim: ascend_endpoint {
        var out = ascend_endpoint()
        out.protocol = kind == .roce ? ASCEND_PROTOCOL_ROCE : ASCEND_PROTOCOL_HCCS
        out.dev_phy_id = physicalID
        if let address {
            out.addr_type = address.isIPv6 ? ASCEND_ADDR_IPV6 : ASCEND_ADDR_IPV4
            withUnsafeMutableBytes(of: &out.addr) { raw in for (i, byte) in address.bytes.enumerated() where i < raw.count { raw[i] = byte } }
        } else {
            out.addr_type = ASCEND_ADDR_ID
            out.id = physicalID
        }
        return out
    }
}
