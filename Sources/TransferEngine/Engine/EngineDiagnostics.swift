/// Upstream's showLinks, warmupEfaSegment and removeLocalSegment: what the local NICs and
/// topology are, connecting to a peer before the first transfer, and forgetting a cached peer.
extension TransferEngine {
    /// One NIC a transport published in this engine's descriptor (`devices`).
    public struct LocalNIC: Sendable, Equatable {
        /// The transport that published it ("rdma", "efa", ...).
        public var transport: String
        /// Its device name.
        public var device: String
        /// Its GID as published ("" when none).
        public var gid: String
        /// The NUMA node whose CPUs prefer it in the topology (-1 when unknown).
        public var numa: Int
    }

    /// The NICs every transport published, in transport order.
    public var localNICs: [LocalNIC] { nics(in: localDescriptor) }

    private func nics(in descriptor: SegmentDescriptor) -> [LocalNIC] {
        var nics: [LocalNIC] = []
        for name in activeProtocols where name != "tcp" {
            let view = descriptor.view(for: name)
            let matrix = view.extra["priority_matrix"]?.objectValue ?? [:]
            for device in view.extra["devices"]?.arrayValue ?? [] {
                guard let deviceName = device["name"]?.stringValue else { continue }
                let numa = matrix.compactMap { location, entry -> Int? in
                    guard location.hasPrefix("cpu:"), let node = Int(location.dropFirst(4)),
                          entry.arrayValue?.first?.arrayValue?.contains(.string(deviceName)) == true else { return nil }
                    return node
                }.min() ?? -1
                nics.append(LocalNIC(transport: name, device: deviceName, gid: device["gid"]?.stringValue ?? "", numa: numa))
            }
        }
        return nics
    }

    /// The topology (upstream's priority matrix: location -> [preferred devices, other devices])
    /// of the first transport that publishes one; empty when none does.
    public var localTopology: [String: JSONValue] { topology(in: localDescriptor) }

    private func topology(in descriptor: SegmentDescriptor) -> [String: JSONValue] {
        for name in activeProtocols where name != "tcp" {
            if let matrix = descriptor.view(for: name).extra["priority_matrix"]?.objectValue, !matrix.isEmpty { return matrix }
        }
        return [:]
    }

    /// Upstream's showLinks: the local NICs and the topology, as text or as JSON
    /// (`local_nics`, `topology`). Speeds and ports are not known here (0); `source` says where
    /// the entry came from.
    public func linksReport(json: Bool) -> String {
        let descriptor = localDescriptor
        let nics = nics(in: descriptor)
        let topology = topology(in: descriptor)
        if json {
            let entries: [JSONValue] = nics.map { nic in
                .object(["device": .string(nic.device), "numa": .int(Int64(nic.numa)), "gid": .string(nic.gid), "gid_index": .int(-1),
                         "port": .uint(0), "speed_gbps": .uint(0), "source": .string("descriptor"), "transport": .string(nic.transport)])
            }
            return JSONValue.object(["local_nics": .array(entries), "topology": .object(topology)]).compactText
        }
        var text = "=== Local NICs ===\n"
        if nics.isEmpty { text += "  (no NICs published: transports \(activeProtocols.joined(separator: ",")))\n" }
        for nic in nics {
            text += "  \(nic.device)  (\(nic.transport))  NUMA=\(nic.numa)\(nic.gid.isEmpty ? "" : "  GID=\(nic.gid)")\n"
        }
        if !topology.isEmpty {
            text += "\n=== Topology (NIC Selection) ===\n"
            for location in topology.keys.sorted() {
                let lists = topology[location]?.arrayValue ?? []
                func names(_ index: Int) -> String {
                    (index < lists.count ? lists[index].arrayValue ?? [] : []).compactMap(\.stringValue).joined(separator: ", ")
                }
                text += "  \(location) -> preferred: [\(names(0))]  available: [\(names(1))]\n"
            }
        }
        return text
    }

    /// Opens `segment` and a link over every installed transport (but tcp) the peer offers, so
    /// the first transfer pays no connection setup (upstream's warmupEfaSegment, for every
    /// transport). Returns the transports it connected; throws naming each that could not.
    @discardableResult
    public func warmUp(segment name: String) throws -> [String] {
        let handle = try openSegment(name)
        guard handle != 0 else { return [] }
        let peer = try peer(handle)
        let offered = state.withLock { _ in peer.offered }
        var connected: [String] = []
        var failures: [String] = []
        for transport in state.withLock({ $0.transports }) where transport.protocolName != "tcp" && offered.contains(transport.protocolName) {
            do {
                _ = try link(to: peer, over: transport)
                connected.append(transport.protocolName)
            } catch {
                failures.append("\(transport.protocolName): \(error)")
            }
        }
        if !failures.isEmpty {
            throw EngineError.segmentUnavailable(name: name, reason: "warm-up could not connect \(failures.joined(separator: "; "))")
        }
        return connected
    }

    /// Forgets the cached descriptor and links of the segment named `name` (leading '/' ignored,
    /// as upstream's removeLocalSegment): its handle stops working and the next openSegment
    /// fetches it anew. Unknown names are fine (nothing to forget).
    public func forgetSegment(named name: String) throws {
        let trimmed = String(name.drop { $0 == "/" })
        guard !trimmed.isEmpty else { throw EngineError.invalidArgument("segment name '\(name)' is empty") }
        // A segment opened under the name with its slashes is found too.
        for handle in state.withLock({ state in [state.handles[name], state.handles[trimmed]].compactMap { $0 } }) {
            try? closeSegment(handle)
        }
    }
}
