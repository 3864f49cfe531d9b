/// Why requests to a peer's buffers take the transports they take (`transfer-engine route`).
public struct RouteReport: Sendable, Equatable {
    /// One transport in the order, or one left out, with the reason.
    public struct Entry: Sendable, Equatable {
        /// Protocol name.
        public var protocolName: String
        /// Why it stands where it does, or why it was left out.
        public var why: String
    }

    /// The peer buffer's start address.
    public var address: UInt64
    /// Its length.
    public var length: UInt64
    /// Its descriptor name (memory location, or the segment name for tcp).
    public var location: String
    /// The protocol the buffer names for itself, if any.
    public var ownProtocol: String?
    /// The transports in the order they are tried; the first carries requests while it works.
    public var order: [Entry]
    /// Installed or requested transports that cannot carry requests to this buffer.
    public var skipped: [Entry]
}

extension TransferEngine {
    /// The route of requests into each of an opened segment's buffers (only the one holding
    /// `address` when given), for this engine's local host memory. `hint` as a request's
    /// `transport_hint`.
    public func routes(segment handle: SegmentHandle, address: UInt64? = nil, hint: String? = nil) throws -> [RouteReport] {
        let peer = try peer(handle)
        let buffers = state.withLock { _ in peer.descriptor.buffers }
        let selected = address.map { a in buffers.filter { $0.contains(address: a, length: 1) } } ?? buffers
        if let address, selected.isEmpty {
            throw EngineError.addressNotRegistered(address: address, length: 1, side: "remote (\(peer.name))")
        }
        return selected.map { buffer in
            let decision = routeDecision(to: peer, remoteProtocol: buffer.ownProtocol,
                                         deviceMemory: !MemoryLocation.isHostAccessible(buffer.name), hint: hint?.lowercased())
            return RouteReport(address: buffer.address, length: buffer.length, location: buffer.name, ownProtocol: buffer.ownProtocol,
                               order: decision.order.map { .init(protocolName: $0.transport.protocolName, why: $0.why) },
                               skipped: decision.skipped.map { .init(protocolName: $0.protocolName, why: $0.reason.description) })
        }
    }
}
