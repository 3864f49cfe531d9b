import CoreMetrics
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

    let factory: any MetricsFactory
    private let meters = ConditionLock<[MeterKey: (peer: String, meter: RequestMeter)]>([:])
    private let peerLabels = ConditionLock<Set<String>>([])
    private let counters = LabelledHandles<Counter>()
    private let timers = LabelledHandles<Timer>()
    /// Requests submitted and not yet ended, over every engine of the process.
    let inFlight: Meter
    let handshakeFailures: Counter
    let notificationsQueued: Counter
    let notificationsDropped: Counter

    init(factory: any MetricsFactory) {
        self.factory = factory
        inFlight = Meter(label: "te_requests_in_flight", dimensions: [], factory: factory)
        handshakeFailures = Counter(label: "te_handshake_failures_total", dimensions: [], factory: factory)
        notificationsQueued = Counter(label: "te_notifications_queued_total", dimensions: [], factory: factory)
        notificationsDropped = Counter(label: "te_notifications_dropped_total", dimensions: [], factory: factory)
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
        return meters.withLock { table in
            if let raced = table[key], raced.peer == peer.name { return raced.meter }
            table[key] = (peer.name, made)
            return made
        }
    }

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
final class RequestMeter: Sendable {
    private let bytes: Counter
    private let requests: Counter
    private let duration: Timer
    private let dimensions: [(String, String)]
    private let failures = LabelledHandles<Counter>()
    private let factory: any MetricsFactory
    private let inFlight: Meter
    private let slices: Counter

    init(peer: String, operation: TransferRequest.Operation, transport: String, batched: Bool, engine: EngineMetrics) {
        let op = operation == .read ? "read" : "write"
        dimensions = [("operation", op), ("transport", transport), ("peer", peer)]
        factory = engine.factory
        inFlight = engine.inFlight
        bytes = Counter(label: "te_transferred_bytes_total", dimensions: dimensions, factory: factory)
        requests = Counter(label: "te_requests_total", dimensions: dimensions + [("kind", batched ? "batch" : "sync")], factory: factory)
        let sliceLabels = [("operation", op), ("transport", transport)]
        slices = engine.counter("te_slices_total", sliceLabels)
        duration = Timer(label: "te_request_duration_seconds", dimensions: [("operation", op), ("kind", batched ? "batch" : "sync")], factory: factory)
    }

    /// A request started in `pieces` slices (counted in flight until `ended`).
    func started(slices pieces: Int = 1) {
        inFlight.increment()
        slices.increment(by: Int64(pieces))
    }

    /// More slices of a started request went to a transport (a failed slice resubmitted).
    func resubmitted(slices pieces: Int) { slices.increment(by: Int64(pieces)) }

    /// A request ended: `state` completed (with `transferred` bytes), failed, timeout or canceled.
    func ended(_ state: TransferState, transferred: UInt64, startedAt: UInt64, now: UInt64 = MonotonicClock.nanoseconds()) {
        inFlight.decrement()
        requests.increment()
        duration.recordNanoseconds(Int64(clamping: now &- startedAt))
        if transferred > 0 { bytes.increment(by: Int64(clamping: transferred)) }
        guard state != .completed else { return }
        let labels = dimensions + [("reason", "\(state)")]
        failures.handle("te_request_failures_total", labels) { Counter(label: "te_request_failures_total", dimensions: labels, factory: factory) }.increment()
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

/// Bytes peers read from and wrote into this engine's memory over TCP (the target side).
final class ServedBytes: Sendable {
    private let read: Counter
    private let written: Counter

    init(factory: any MetricsFactory) {
        read = Counter(label: "te_served_bytes_total", dimensions: [("operation", "read"), ("transport", "tcp")], factory: factory)
        written = Counter(label: "te_served_bytes_total", dimensions: [("operation", "write"), ("transport", "tcp")], factory: factory)
    }

    func add(_ operation: TCPWire.Operation, _ bytes: UInt64) {
        (operation == .read ? read : written).increment(by: Int64(clamping: bytes))
    }
}
