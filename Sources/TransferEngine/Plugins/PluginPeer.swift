/// A peer opened in a plugin (its open_peer handle), seen as a transport peer.
final class PluginPeer: TransportPeer, @unchecked Sendable {
    private let transport: PluginTransport
    let handle: UInt64
    private let segment: String

    init(transport: PluginTransport, handle: UInt64, segment: String) {
        self.transport = transport
        self.handle = handle
        self.segment = segment
    }

    func submit(_ slices: [TransferSlice]) { transport.submit(slices, peer: handle) }

    func transferSync(_ operation: TransferRequest.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64,
                      deadline: UInt64) -> SyncOutcome? {
        transport.transferSync(operation, local: localAddress, peer: handle, remote: remoteAddress, length: length, deadline: deadline)
    }

    func close() { transport.closePeer(handle) }
}
