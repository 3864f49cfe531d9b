import CoreMetrics
import Prometheus
import Synchronization

/// Whether this process records engine metrics, and the registry they go to. Recording is off
/// until something asks for it: `MC_TE_METRIC`, `MC_METRICS`, `MC_METRICS_PORT`, the CLI's
/// `--metrics-port`, or `enable()`; engines created while it is off hold no metric handles, so
/// their transfers pay nothing. Metrics go through swift-metrics to a swift-prometheus registry
/// of their own (not `MetricsSystem`'s global factory, which an embedding application may own).
public enum EngineMetricsRegistry {
    private static let current = ConditionLock<PrometheusCollectorRegistry?>(nil)

    /// Latency buckets, in seconds: 5 us to 10 s. Twelve: swift-prometheus updates every bucket
    /// at each observation, so each one costs every synchronous request a few instructions.
    static let durationBuckets: [Double] = [5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 5e-3, 2.5e-2, 0.1, 1, 10]

    /// Turns recording on for engines created from now on (idempotent); returns the registry.
    /// Request counts reach it when it is read through `registry` or `text()`, or after `publish()`:
    /// call that before rendering a reference kept from here.
    @discardableResult
    public static func enable() -> PrometheusCollectorRegistry {
        current.withLock { registry in
            if let registry { return registry }
            let made = PrometheusCollectorRegistry()
            registry = made
            return made
        }
    }

    /// The registry, or nil while recording is off, with everything recorded so far in it
    /// (`publish()` runs first).
    public static var registry: PrometheusCollectorRegistry? {
        guard current.withLock({ $0 }) != nil else { return nil }
        publish()
        return current.withLock { $0 }
    }

    /// Adds to the registry what requests counted into atomics of their own since the last call,
    /// sets the in-flight gauge, and reads the plugins' per-device figures (nothing while off).
    public static func publish() {
        guard let factory else { return }
        PendingCounts.publish(factory: factory)
        DeviceMetrics.refresh()
    }

    /// The factory engines record through, or nil while recording is off.
    static var factory: EngineMetricsFactory? { current.withLock { $0 }.map { EngineMetricsFactory(registry: $0, buckets: durationBuckets) } }

    /// Whether `environment` asks for metrics (and turns them on when it does).
    static func enableIfAsked(_ environment: [String: String]) {
        let asked = ProtocolSelector.truthy(environment["MC_TE_METRIC"]) || ProtocolSelector.truthy(environment["MC_METRICS"])
            || !(environment["MC_METRICS_PORT"] ?? "").isEmpty
        if asked { enable() }
    }

    private static let counters = LabelledHandles<CoreMetrics.Counter>()

    /// Counts one event of a process-level counter (nothing while recording is off).
    public static func increment(_ name: String, _ dimensions: [(String, String)]) {
        guard let factory else { return }
        counters.handle(name, dimensions) { CoreMetrics.Counter(label: name, dimensions: dimensions, factory: factory) }.increment()
    }

    /// The Prometheus text format of everything recorded so far ("" while off), published first
    /// (the plugins' per-device figures read now).
    public static func text() -> String {
        guard let registry else { return "" }
        return registry.emitToString()
    }

    /// `text()` as the JSON `metricsJSON` gives (`enabled`, `totals`, `series`), compact.
    public static func jsonText() -> String {
        let enabled = current.withLock { $0 } != nil
        return MetricsSnapshot.json(MetricsSnapshot.parse(text()), enabled: enabled).compactText
    }

    /// One summary line of the totals so far, as rates over `seconds` (the /metrics/summary view).
    public static func summary(seconds: Double) -> String {
        MetricsSnapshot.summary(MetricsSnapshot.parse(text()), previous: [], seconds: seconds)
    }
}
