import CRDMAShim
import CTransportABI
import TransportPluginKit
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Building, connecting and replacing a device's endpoints.

extension RDMADevice {
    /// The QP's transport retry count: 7 as upstream, except on soft-RoCE (vendor 0xffffff), whose
    /// driver reads 7 as "retry forever" (as the verbs spec does only for the RNR count), so a
    /// killed peer's work requests would wait for MC_SLICE_TIMEOUT instead of failing within a second.
    static func transportRetries(vendorID: UInt32) -> UInt8 { vendorID == 0xFF_FFFF ? 6 : 7 }

    /// Creates the QPs of a new endpoint (RESET state).
    func makeEndpoint() -> Result<Endpoint, VerbsError> {
        var pairs: [OpaquePointer] = [], numbers: [UInt32] = []
        for _ in 0..<options.queuePairsPerEndpoint {
            var qp: OpaquePointer?
            var number: UInt32 = 0
            let status = rdma_create_qp(handle, UInt32(options.maxWorkRequests), 64, &qp, &number)
            guard status == 0, let qp else {
                for made in pairs { rdma_destroy_qp(made) }
                return .failure(VerbsError(code: -status))
            }
            pairs.append(qp)
            numbers.append(number)
        }
        return .success(Endpoint(queuePairs: pairs, numbers: numbers))
    }

    /// Moves every QP of `endpoint` to RTS against the peer's QPs.
    func connect(_ endpoint: Endpoint, peerQueuePairs: [UInt32], peerLID: UInt16, peerGID: [UInt8]) -> Int32 {
        for (qp, remote) in zip(endpoint.queuePairs, peerQueuePairs) {
            var path = rdma_path()
            path.port = discovered.info.port
            path.gid_index = discovered.gid.index
            path.mtu = mtu
            path.remote_qp_num = remote
            path.remote_lid = peerLID
            withUnsafeMutableBytes(of: &path.remote_gid) { raw in for i in 0..<16 { raw[i] = peerGID[i] } }
            path.traffic_class = options.trafficClass
            path.service_level = options.serviceLevel
            path.timeout = 14
            path.retry_count = Self.transportRetries(vendorID: discovered.info.vendor_id)
            path.rnr_retry = 7
            let status = rdma_connect_qp(qp, &path)
            if status != 0 { return status }
        }
        return 0
    }

    /// Installs `endpoint` as the connection's current one; the old one retires.
    func install(_ endpoint: Endpoint, on connection: Connection) {
        lock.locked { replaceLocked(connection, with: endpoint) }
    }

    /// Adds a connection (or replaces the endpoint of an existing one with the same peer path, as
    /// a reconnecting peer needs); the reason when it may not: no handshake adds connections past
    /// `MC_RDMA_MAX_ENDPOINTS`. A peer path is public (segment@device); without authentication a
    /// handshake claiming a live peer's path costs that peer a reconnect (its next slice fails and
    /// the endpoint is rebuilt), never bytes, since the responder checks every key and range.
    func register(_ connection: Connection) -> Result<Connection, FailureText> {
        lock.locked {
            if let existing = connections[connection.peerNicPath] {
                replaceLocked(existing, with: connection.current)
                return .success(existing)
            }
            guard connections.count < options.maxEndpoints else {
                return .failure(FailureText("\(name) already has \(options.maxEndpoints) endpoints (MC_RDMA_MAX_ENDPOINTS)"))
            }
            connections[connection.peerNicPath] = connection
            return .success(connection)
        }
    }

    /// Points `connection` at `endpoint`; the previous endpoint stops taking work and is destroyed once drained. Lock held.
    func replaceLocked(_ connection: Connection, with endpoint: Endpoint) {
        let old = connection.current
        connection.current = endpoint
        guard old !== endpoint else { return }
        old.retired = true
        old.broken = true
        retired.append(old)
        reapRetired()
    }

    /// Destroys retired endpoints with nothing in flight. Lock held.
    func reapRetired() {
        retired.removeAll { endpoint in
            guard endpoint.outstanding.allSatisfy({ $0 == 0 }) else { return false }
            endpoint.destroy()
            return true
        }
    }
}
