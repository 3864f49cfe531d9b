import CoreMetrics
import typealias Prometheus.ValueHistogram
import Synchronization

/// One engine's metric handles, made once and kept: a transfer looks its meter up by peer,
/// operation and transport and records with atomic adds. Peers past `maxPeerLabels` share the
/// label value "other", so the number of series stays bounded.
final class EngineMetrics: Sendable {
    /// Most peers with a label value of their own.
    static let maxPeerLabels = 64

    /// Keyed by object identities (hashing integers, not names, on every request); the peer's
    /// name is kept with the meter and compared on a hit, since a freed peer's identity may return.
    private struct MeterKey: Hashable {
        var peer: ObjectIdentifier
        var transport: ObjectIdentifier?
        var local: Bool
        var operation: TransferRequest.Operation
        var batched: Bool
    }

    let factory: EngineMetricsFactory
    private let meters = ConditionLock<[MeterKey: (peer: String, meter: RequestMeter)]>([:])
    private let peerLabels = ConditionLock<Set<String>>([])
    private let counters = LabelledHandles<Counter>()
    private let timers = LabelledHandles<Timer>()
    let handshakeFailures: Counter
    let notificationsQueued: Counter
    let notificationsDropped: Counter

    /// Bytes peers moved through this engine's TCP data server.
    let served: ServedBytes

    init(factory: EngineMetricsFactory) {
        self.factory = factory
        handshakeFailures = Counter(label: "te_handshake_failures_total", dimensions: [], factory: factory)
        notificationsQueued = Counter(label: "te_notifications_queued_total", dimensions: [], factory: factory)
        notificationsDropped = Counter(label: "te_notifications_dropped_total", dimensions: [], factory: factory)
        served = ServedBytes(factory: factory)
        PendingCounts.track(served)
    }

    /// Publishes what its meters counted last, and stops publishing them.
    deinit {
        let made = meters.withLock { $0.values.map(\.meter) }
        made.forEach { $0.publish() }
        served.publish()
        PendingCounts.untrack(made.map { ObjectIdentifier($0) } + [ObjectIdentifier(served)])
    }

    /// The engine's metrics, or nil when recording is off for this process.
    static func make() -> EngineMetrics? { EngineMetricsRegistry.factory.map { EngineMetrics(factory: $0) } }

    /// The label value for a peer: its segment name, or "other" past the first `maxPeerLabels`.
    func peerLabel(_ name: String) -> String {
        peerLabels.withLock { known in
            if known.contains(name) { return name }
            guard known.count < Self.maxPeerLabels else { return "other" }
            known.insert(name)
            return name
        }
    }

    /// The meter for requests to `peer` over `transport` (nil: "local" for a copy within this
    /// engine, else "none": no path opened); `batched`: submitted in a batch, else synchronous.
    func meter(peer: TransferEngine.Peer, operation: TransferRequest.Operation, transport: (any Transport)?, local: Bool = false,
               batched: Bool) -> RequestMeter {
        let key = MeterKey(peer: ObjectIdentifier(peer), transport: transport.map { ObjectIdentifier($0) }, local: local,
                           operation: operation, batched: batched)
        if let known = meters.withLock({ $0[key] }), known.peer == peer.name { return known.meter }
        let name = transport?.protocolName ?? (local ? "local" : "none")
        let made = RequestMeter(peer: peerLabel(peer.name), operation: operation, transport: name, batched: batched, engine: self)
        let (meter, replaced) = meters.withLock { table -> (RequestMeter, RequestMeter?) in
            if let raced = table[key], raced.peer == peer.name { return (raced.meter, nil) }
            // A peer freed and another made at its address: its meter is replaced.
            let replaced = table[key]?.meter
            table[key] = (peer.name, made)
            // Tracked while in the table (forgetMeters untracks under this lock too).
            PendingCounts.track(made)
            return (made, replaced)
        }
        if let replaced {
            replaced.publish()
            PendingCounts.untrack([ObjectIdentifier(replaced)])
        }
        return meter
    }

    /// Publishes a closed peer's meters one last time and drops them (the table would keep them
    /// for good otherwise, one set per segment ever opened). A request planned before the close
    /// and ended after it makes a new meter for the closed peer, kept until the engine goes.
    func forgetMeters(of peer: TransferEngine.Peer) {
        let id = ObjectIdentifier(peer)
        let dropped = meters.withLock { table -> [RequestMeter] in
            let dropped = table.keys.filter { $0.peer == id }.compactMap { table.removeValue(forKey: $0)?.meter }
            PendingCounts.untrack(dropped.map { ObjectIdentifier($0) })
            return dropped
        }
        dropped.forEach { $0.publish() }
    }

    /// Meters kept (for tests).
    var meterCount: Int { meters.withLock { $0.count } }

    /// Counts one event of a labelled counter, made on first use (connections, failovers).
    func count(_ name: String, _ dimensions: [(String, String)]) { counter(name, dimensions).increment() }

    /// The labelled counter, made on first use and shared.
    func counter(_ name: String, _ dimensions: [(String, String)]) -> Counter {
        counters.handle(name, dimensions) { Counter(label: name, dimensions: dimensions, factory: factory) }
    }

    /// Records one duration of a labelled timer, made on first use (metadata operations).
    func time(_ name: String, _ dimensions: [(String, String)], nanoseconds: UInt64) {
        timers.handle(name, dimensions) { Timer(label: name, dimensions: dimensions, factory: factory) }.recordNanoseconds(Int64(clamping: nanoseconds))
    }

    /// A request left its first path for `to` after `from` failed.
    func failover(from: String, to: String) { count("te_failovers_total", [("from", from), ("to", to)]) }

    /// A link to a peer opened over `transport`, or failed to.
    func connection(transport: String, opened: Bool) {
        count(opened ? "te_connections_opened_total" : "te_connection_failures_total", [("transport", transport)])
    }
}

extension TransferEngine {
    /// A callback counting into `counter`, or nil without one.
    static func counting(_ counter: Counter?) -> (@Sendable () -> Void)? {
        guard let counter else { return nil }
        return { counter.increment() }
    }
}

/// The handles one kind of request records into: bytes, requests, failures by reason, latency.
/// Counts go into atomics of the meter itself, added to the swift-metrics handles when the metrics
/// are rendered (`PendingCounts`), so a request pays a few atomic adds and one histogram record.
final class RequestMeter: PublishesLater {
    private let pendingBytes = Atomic<UInt64>(0)
    private let pendingRequests = Atomic<UInt64>(0)
    private let pendingSlices = Atomic<UInt64>(0)
    private let bytes: Counter
    private let requests: Counter
    private let slices: Counter
    /// Seconds from start to end (swift-prometheus's histogram itself: no handler in between).
    private let duration: ValueHistogram
    private let dimensions: [(String, String)]
    private let failures = LabelledHandles<Counter>()
    private let factory: EngineMetricsFactory

    init(peer: String, operation: TransferRequest.Operation, transport: String, batched: Bool, engine: EngineMetrics) {
        let op = operation.description
        dimensions = [("operation", op), ("transport", transport), ("peer", peer)]
        factory = engine.factory
        bytes = Counter(label: "te_transferred_bytes_total", dimensions: dimensions, factory: factory)
        requests = Counter(label: "te_requests_total", dimensions: dimensions + [("kind", batched ? "batch" : "sync")], factory: factory)
        slices = engine.counter("te_slices_total", [("operation", op), ("transport", transport)])
        duration = factory.histogram("te_request_duration_seconds", [("operation", op), ("kind", batched ? "batch" : "sync")])
    }

    deinit { publish() }

    /// A request started in `pieces` slices (counted in flight until `ended`).
    func started(slices pieces: Int = 1) {
        PendingCounts.requestsInFlight.wrappingAdd(1, ordering: .relaxed)
        pendingSlices.wrappingAdd(UInt64(max(pieces, 0)), ordering: .relaxed)
    }

    /// More slices of a started request went to a transport (a failed slice resubmitted).
    func resubmitted(slices pieces: Int) { pendingSlices.wrappingAdd(UInt64(max(pieces, 0)), ordering: .relaxed) }

    /// A request ended: `state` completed (with `transferred` bytes), failed, timeout or canceled.
    func ended(_ state: TransferState, transferred: UInt64, startedAt: UInt64, now: UInt64 = MonotonicClock.nanoseconds()) {
        PendingCounts.requestsInFlight.wrappingSubtract(1, ordering: .relaxed)
        pendingRequests.wrappingAdd(1, ordering: .relaxed)
        duration.record(Double(now &- startedAt) / 1e9)
        if transferred > 0 { pendingBytes.wrappingAdd(transferred, ordering: .relaxed) }
        guard state != .completed else { return }
        let labels = dimensions + [("reason", "\(state)")]
        failures.handle("te_request_failures_total", labels) { Counter(label: "te_request_failures_total", dimensions: labels, factory: factory) }.increment()
    }

    func publish() {
        PendingCounts.move(pendingRequests, to: requests)
        PendingCounts.move(pendingBytes, to: bytes)
        PendingCounts.move(pendingSlices, to: slices)
    }
}

/// Metric handles by name and labels, each made on first use and kept.
final class LabelledHandles<Handle: AnyObject>: @unchecked Sendable {
    private let table = ConditionLock<[String: Handle]>([:])

    /// The handle for `name` with `dimensions`, made by `make` the first time.
    func handle(_ name: String, _ dimensions: [(String, String)], make: () -> Handle) -> Handle {
        let key = name + dimensions.map { "\u{1}\($0.0)=\($0.1)" }.joined()
        return table.withLock { table in
            if let known = table[key] { return known }
            let made = make()
            table[key] = made
            return made
        }
    }
}

/// Bytes peers read from and wrote into this engine's memory over TCP (the target side), counted
/// like a request meter's (atomics, published later).
final class ServedBytes: PublishesLater {
    private let pendingRead = Atomic<UInt64>(0)
    private let pendingWritten = Atomic<UInt64>(0)
    private let read: Counter
    private let written: Counter

    init(factory: any MetricsFactory) {
        read = Counter(label: "te_served_bytes_total", dimensions: [("operation", "read"), ("transport", "tcp")], factory: factory)
        written = Counter(label: "te_served_bytes_total", dimensions: [("operation", "write"), ("transport", "tcp")], factory: factory)
    }

    deinit { publish() }

    func add(_ operation: TCPWire.Operation, _ bytes: UInt64) {
        if operation == .read { pendingRead.wrappingAdd(bytes, ordering: .relaxed) } else { pendingWritten.wrappingAdd(bytes, ordering: .relaxed) }
    }

    func publish() {
        PendingCounts.move(pendingRead, to: read)
        PendingCounts.move(pendingWritten, to: written)
    }
}
