/// What routing costs per request, measured on a live engine and an opened peer (`transfer-engine
/// bench-router`).
public struct RoutingCost: Sendable, Equatable {
    /// Planning one request when the peer's route is kept (the common case), ns.
    public var cachedPlanNs: Double
    /// Planning one request with a transport hint (its route kept per hint), ns.
    public var decidedPlanNs: Double
    /// One full router decision (every installed transport ordered, with reasons), ns.
    public var decisionNs: Double
    /// Requests timed per figure.
    public var iterations: Int
}

extension TransferEngine {
    /// Times planning of a `length`-byte write from `localAddress` to `remoteAddress` in the opened
    /// `segment` (both registered), `iterations` times per figure. Nothing is sent.
    public func measureRouting(segment: SegmentHandle, localAddress: UInt64, remoteAddress: UInt64, length: UInt64 = 4096,
                               iterations: Int = 200_000) throws -> RoutingCost {
        let request = TransferRequest(operation: .write, localAddress: localAddress, segment: segment, remoteAddress: remoteAddress, length: length)
        let count = max(1, min(iterations, 10_000_000))
        func time(_ body: () throws -> Void) rethrows -> Double {
            let start = MonotonicClock.nanoseconds()
            for _ in 0..<count { try body() }
            return Double(MonotonicClock.nanoseconds() - start) / Double(count)
        }
        // The first plan opens nothing but keeps the route; the loops then measure steady state.
        var warm: PlanCache? = nil
        _ = try plan(request, cache: &warm, hint: nil)
        let hint = activeProtocols.first ?? "tcp"
        let cached = try time {
            var cache: PlanCache? = nil
            _ = try plan(request, cache: &cache, hint: nil)
        }
        let decided = try time {
            var cache: PlanCache? = nil
            _ = try plan(request, cache: &cache, hint: hint)
        }
        let target = try peer(segment)
        let decision = time { _ = routeDecision(to: target, remoteProtocol: nil, deviceMemory: false, hint: nil) }
        return RoutingCost(cachedPlanNs: cached, decidedPlanNs: decided, decisionNs: decision, iterations: count)
    }
}
