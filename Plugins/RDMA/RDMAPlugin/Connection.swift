import CRDMAShim
import CTransportABI
import TransportPluginKit
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Queue-pair endpoints, the connections that hold them, and the slices posted on them.

/// A set of RC queue pairs to one peer NIC, from one local device. Replaced (not repaired) after a QP error.
final class Endpoint: @unchecked Sendable {
    let queuePairs: [OpaquePointer]
    let queuePairNumbers: [UInt32]
    /// Work requests in flight per QP (guarded by the device lock, which makes access exclusive).
    @exclusivity(unchecked) var outstanding: [Int]
    /// A QP reported an error: nothing more is posted here.
    @exclusivity(unchecked) var broken = false
    /// Replaced by a newer endpoint: its QPs are destroyed once nothing is in flight.
    @exclusivity(unchecked) var retired = false

    init(queuePairs: [OpaquePointer], numbers: [UInt32]) {
        self.queuePairs = queuePairs
        queuePairNumbers = numbers
        outstanding = Array(repeating: 0, count: queuePairs.count)
    }

    func destroy() { for qp in queuePairs { rdma_destroy_qp(qp) } }
}

/// The link from a local device to one peer NIC path; `current` changes when the endpoint is rebuilt.
final class Connection: @unchecked Sendable {
    let peerNicPath: String
    let peerSegment: String
    /// The peer's device index (for its rkeys); under the device lock (a passive connection learns it later).
    @exclusivity(unchecked) var peerDevice: Int
    @exclusivity(unchecked) var current: Endpoint
    /// Opened peers (open_peer handles) that use it.
    let users = Atomic<Int>(0)
    /// Every peer that used it was closed (the host does so when a peer restarted under the same
    /// name): the next open_peer connects afresh instead of trusting the old queue pairs.
    let stale = Atomic<Bool>(false)
    init(peerNicPath: String, peerSegment: String, peerDevice: Int, endpoint: Endpoint) {
        self.peerNicPath = peerNicPath
        self.peerSegment = peerSegment
        self.peerDevice = peerDevice
        current = endpoint
    }
}

/// One slice of a request: one RDMA WRITE or READ work request.
struct Part {
    var isWrite: Bool
    var local: UInt64
    var length: UInt32
    var lkey: UInt32
    var remote: UInt64
    var rkey: UInt32
    /// The parent request's record, or 0 for a request of one slice, which `cookie` completes.
    var parent: UInt64
    var cookie: UInt64
    var connection: Connection
    var retries: Int = 0
}

/// A finished slice, reported outside the device lock.
struct FinishedPart {
    var parent: UInt64
    var cookie: UInt64
    var status: Int32
    var bytes: UInt64
    var error: String?
    /// Set for a failed slice that may be retried on a rebuilt endpoint.
    var retry: Part?
}
