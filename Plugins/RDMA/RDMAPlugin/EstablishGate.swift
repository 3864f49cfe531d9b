import TransportPluginKit
/// One endpoint establishment per (device, peer NIC path) at a time.
///
/// The passive side keeps the endpoint of the latest handshake for a NIC path and drops the one
/// before. Two handshakes in flight at once for one path (two threads opening the same peer, or
/// an open racing a repair) can be answered there in one order and registered here in the
/// other: this side then posts to QPs whose partners the peer destroyed, and that work never
/// completes (it waits for the slice timeout's flush). Establishing one at a time, and reusing
/// what the first one built, keeps both sides on the same endpoint.
extension RDMADevice {
    /// Runs `body` (which establishes and registers an endpoint to `peerPath`) unless another
    /// thread is doing so: then waits for it, at most `waitNanoseconds`, and returns the
    /// connection it left when `reuse` accepts it. `body` runs without the lock.
    func establishing(_ peerPath: String, waitNanoseconds: UInt64, reuse: (Connection) -> Bool,
                      _ body: () -> Result<Connection, FailureText>) -> Result<Connection, FailureText> {
        enum Turn { case reuse(Connection), mine, unguarded }
        let turn = lock.locked { () -> Turn in
            let deadline = monotonicNanoseconds() + waitNanoseconds
            while connecting.contains(peerPath) {
                if monotonicNanoseconds() >= deadline { return .unguarded }
                lock.wait(nanoseconds: 10_000_000)
            }
            if let existing = connections[peerPath], reuse(existing) { return .reuse(existing) }
            connecting.insert(peerPath)
            return .mine
        }
        switch turn {
        case .reuse(let existing):
            return .success(existing)
        case .unguarded:
            // The other establishment is stuck (a handshake that does not answer): go ahead.
            return body()
        case .mine:
            defer { lock.locked { connecting.remove(peerPath); lock.broadcast() } }
            return body()
        }
    }

    /// After the peer refused our handshake because its own to us goes first: waits (at most
    /// `nanoseconds`) until that handshake has put a new endpoint (not `before`) on the path,
    /// then returns the connection, made to address the peer's device `peerDevice` and fresh.
    func awaitPassive(_ peerPath: String, replacing before: Endpoint?, peerDevice: Int, nanoseconds: UInt64) -> Result<Connection, FailureText> {
        let deadline = monotonicNanoseconds() + nanoseconds
        return lock.locked {
            while monotonicNanoseconds() < deadline {
                if let connection = connections[peerPath], connection.current !== before, !connection.current.broken {
                    connection.peerDevice = peerDevice
                    connection.stale.store(false, ordering: .releasing)
                    return .success(connection)
                }
                lock.wait(nanoseconds: 10_000_000)
            }
            return .failure(FailureText("\(peerPath) refused our handshake for its own, which did not arrive within \(nanoseconds / 1_000_000_000) s"))
        }
    }
}
