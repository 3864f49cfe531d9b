import CoreMetrics
import Synchronization

/// Something that counts into atomics of its own on a request's hot path and adds them to its
/// swift-metrics handles in `publish` (when the metrics are rendered, and when it is released).
/// A synchronous 4 KiB transfer takes about 10 us; a swift-metrics handle call per count cost a
/// measurable share of that, a relaxed atomic add does not.
protocol PublishesLater: AnyObject, Sendable {
    /// Adds what was counted since the last call to the handles.
    func publish()
}

/// The process's deferred counts: published before the registry is rendered, and the process's
/// requests in flight (the `te_requests_in_flight` gauge is set from it then). Held strongly until
/// their engine's metrics go (a weak reference would give each meter a side table, which sends
/// every retain and release of it, one per batched task, down the runtime's slow path).
enum PendingCounts {
    private static let tracked = ConditionLock<[ObjectIdentifier: any PublishesLater]>([:])

    /// Requests submitted and not yet ended, over every engine of the process.
    static let requestsInFlight = Atomic<Int>(0)

    /// Publishes `counts` with the others from now on (until `untrack`).
    static func track(_ counts: any PublishesLater) {
        tracked.withLock { $0[ObjectIdentifier(counts)] = counts }
    }

    /// Stops publishing these (their owner published them a last time).
    static func untrack(_ ids: [ObjectIdentifier]) {
        let gone = tracked.withLock { table in ids.compactMap { table.removeValue(forKey: $0) } }
        withExtendedLifetime(gone) {}  // released outside the lock
    }

    /// Moves what `pending` holds into `counter`.
    static func move(_ pending: borrowing Atomic<UInt64>, to counter: Counter) {
        let amount = pending.exchange(0, ordering: .relaxed)
        if amount > 0 { counter.increment(by: Int64(clamping: amount)) }
    }

    /// Serializes setting the in-flight gauge, so two renders at once cannot leave the older reading.
    private static let settingGauge = ConditionLock(())

    /// Publishes every tracked object (outside the lock) and sets the in-flight gauge.
    static func publish(factory: any MetricsFactory) {
        let live = tracked.withLock { Array($0.values) }
        for counts in live { counts.publish() }
        let gauge = Meter(label: "te_requests_in_flight", dimensions: [], factory: factory)
        settingGauge.withLock { _ in gauge.set(Int64(requestsInFlight.load(ordering: .relaxed))) }
    }
}
