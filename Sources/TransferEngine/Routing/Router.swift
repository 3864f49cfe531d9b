import Synchronization

/// Picks, per request, the transports that can carry it and their order, and remembers which
/// paths (transport, peer) failed recently. The order, unless a buffer forces one:
///
/// 1. the remote buffer's own protocol (an NVMe-oF namespace, a CXL pool) — then only it;
/// 2. the request's transport hint;
/// 3. shm for a peer on this host, when both sides have it;
/// 4. the configured order (`protocol` list);
/// 5. tcp, always last.
///
/// Device memory (GPU, NPU) goes only to transports that move it. A path that failed stays at
/// the end of the order for `cooldownNs`, then takes its place again.
final class Router: Sendable {
    /// Why a transport stands where it does in an order, or why it was left out. Kept as a
    /// value and worded only when shown: a decision is made on the request path.
    enum Reason: CustomStringConvertible {
        case ownProtocol(String)
        case hint
        case sameHost
        case configured(position: Int)
        case lastResort
        case cooling(msLeft: UInt64)
        case onlyOwn(String)
        case ownNotInstalled(String)
        case notOffered(segment: String, protocolName: String)
        case noDeviceMemory
        case notInstalled(segment: String)
        case unreachable(segment: String, reason: String)

        var description: String {
            switch self {
            case .ownProtocol(let name): return "the buffer is served by \(name)"
            case .hint: return "the request's transport hint"
            case .sameHost: return "same host: shm first"
            case .configured(let position): return "configured order, position \(position)"
            case .lastResort: return "tcp is the last resort"
            case .cooling(let ms): return "failed recently; tried last for \(ms) ms more"
            case .onlyOwn(let name): return "the buffer is served only by \(name)"
            case .ownNotInstalled(let name): return "the buffer is served by \(name), which is not installed here"
            case .notOffered(let segment, let name): return "\(segment) does not offer \(name)"
            case .noDeviceMemory: return "it does not move device memory"
            case .notInstalled(let segment): return "\(segment) offers it, but it is not installed here"
            case .unreachable(let segment, let reason): return "cannot reach \(segment): \(reason)"
            }
        }
    }

    /// One transport in a decision, and why it stands where it does.
    struct Choice {
        var transport: any Transport
        var reason: Reason
        var why: String { reason.description }
    }

    /// The outcome for one (peer, buffer) pair: the order to try, and the transports left out with the reason.
    struct Decision {
        var order: [Choice]
        var skipped: [(protocolName: String, reason: Reason)]
        /// The earliest time (monotonic ns) a path in cooldown returns; the decision holds until then.
        var validUntil: UInt64
    }

    /// What routing needs to know about the target.
    struct Target {
        var segment: String
        /// Protocols the peer offers (its descriptor's list, and tcp when it has a data port).
        var offered: Set<String>
        var sameHost: Bool
        /// Transports that could not reach this peer at all, with the reason (connect failed).
        var unreachable: [String: String]
    }

    private struct PathKey: Hashable {
        var protocolName: String
        var segment: String
    }

    let cooldownNs: UInt64
    private let failures = ConditionLock<[PathKey: UInt64]>([:])
    /// Bumped by every failure, so routes cached elsewhere are recomputed.
    let generation = Atomic<UInt64>(0)

    init(cooldownNs: UInt64) {
        self.cooldownNs = cooldownNs
    }

    /// Marks the path to be tried last until the cooldown passes; true when it was healthy
    /// (the first failure of a run: worth one log line).
    @discardableResult
    func markFailed(_ protocolName: String, segment: String, now: UInt64 = MonotonicClock.nanoseconds()) -> Bool {
        let wasHealthy = failures.withLock { table in
            let key = PathKey(protocolName: protocolName, segment: segment)
            let healthy = (table[key] ?? 0) <= now
            table[key] = now + cooldownNs
            return healthy
        }
        generation.add(1, ordering: .relaxed)
        return wasHealthy
    }

    /// Until when (monotonic ns) the path is cooling down, or nil when it is healthy.
    func coolingUntil(_ protocolName: String, segment: String, now: UInt64) -> UInt64? {
        failures.withLock { table in
            let key = PathKey(protocolName: protocolName, segment: segment)
            guard let until = table[key] else { return nil }
            if until <= now { table.removeValue(forKey: key); return nil }
            return until
        }
    }

    /// Whether any path is cooling down (a cheap check before computing the health order).
    var anyCooling: Bool { failures.withLock { !$0.isEmpty } }

    /// The order for one request. `installed` is in configured order with tcp last.
    func decide(installed: [any Transport], target: Target, remoteProtocol: String?, deviceMemory: Bool, hint: String?,
                now: UInt64 = MonotonicClock.nanoseconds()) -> Decision {
        var order: [Choice] = []
        var skipped: [(protocolName: String, reason: Reason)] = []
        if let own = remoteProtocol {
            for transport in installed where transport.protocolName != own {
                skipped.append((transport.protocolName, .onlyOwn(own)))
            }
            if let transport = installed.first(where: { $0.protocolName == own }) {
                if deviceMemory && !transport.movesDeviceMemory {
                    skipped.append((own, .noDeviceMemory))
                } else {
                    order.append(Choice(transport: transport, reason: .ownProtocol(own)))
                }
            } else {
                skipped.append((own, .ownNotInstalled(own)))
            }
        } else {
            for (rank, transport) in installed.enumerated() {
                let name = transport.protocolName
                if !target.offered.contains(name) {
                    skipped.append((name, .notOffered(segment: target.segment, protocolName: name)))
                } else if deviceMemory && !transport.movesDeviceMemory {
                    skipped.append((name, .noDeviceMemory))
                } else {
                    order.append(Choice(transport: transport, reason: transport is TCPTransport ? .lastResort : .configured(position: rank + 1)))
                }
            }
            for name in target.offered.sorted() where name != "tcp" && !installed.contains(where: { $0.protocolName == name }) {
                skipped.append((name, .notInstalled(segment: target.segment)))
            }
            if target.sameHost, let index = order.firstIndex(where: { $0.transport.protocolName == "shm" }) {
                var shm = order.remove(at: index)
                shm.reason = .sameHost
                order.insert(shm, at: 0)
            }
            if let hint, !hint.isEmpty, let index = order.firstIndex(where: { $0.transport.protocolName == hint }) {
                var hinted = order.remove(at: index)
                hinted.reason = .hint
                order.insert(hinted, at: 0)
            }
        }
        // Transports that could not connect to this peer are left out; those cooling down go last.
        if !target.unreachable.isEmpty {
            order.removeAll { choice in
                guard let reason = target.unreachable[choice.transport.protocolName] else { return false }
                skipped.append((choice.transport.protocolName, .unreachable(segment: target.segment, reason: reason)))
                return true
            }
        }
        var validUntil = UInt64.max
        if anyCooling {
            var healthy: [Choice] = []
            var cooling: [Choice] = []
            for var choice in order {
                if let until = coolingUntil(choice.transport.protocolName, segment: target.segment, now: now) {
                    validUntil = min(validUntil, until)
                    choice.reason = .cooling(msLeft: (until - now) / 1_000_000)
                    cooling.append(choice)
                } else {
                    healthy.append(choice)
                }
            }
            order = healthy + cooling
        }
        return Decision(order: order, skipped: skipped, validUntil: validUntil)
    }
}

/// A request's transports in the order to try them, shared by every request routed the same
/// way (the engine compares orders by identity, without touching the transports).
final class RouteOrder: @unchecked Sendable {
    let transports: [any Transport]

    init(_ transports: [any Transport]) { self.transports = transports }

    /// The order of a request that needs no transport (zero length, or a local copy).
    static let none = RouteOrder([])
}

extension SegmentDescriptor {
    /// The protocols this descriptor's owner offers: its "protocols" list (this engine's
    /// multi-transport form) or its single protocol, plus tcp when it has a data port.
    public var offeredProtocols: Set<String> {
        var offered: Set<String> = [protocolName]
        if let list = extra["protocols"]?.arrayValue {
            for entry in list.prefix(64) { if let name = entry.stringValue, name.count <= 64 { offered.insert(name) } }
        }
        if tcpDataPort != 0 { offered.insert("tcp") } else { offered.remove("tcp") }
        return offered
    }
}
