import CoreMetrics
import Prometheus

/// The swift-metrics factory engines record through: swift-prometheus's metrics in the engine's
/// registry, each family with its `# HELP` line (swift-prometheus's own factory writes none, which
/// `promtool check metrics` reports). Timers are histograms of seconds with `buckets` (as Double:
/// recording compares doubles, not `Duration`s).
struct EngineMetricsFactory: MetricsFactory {
    let registry: PrometheusCollectorRegistry
    let buckets: [Double]

    /// Help text by metric name.
    static let help: [String: String] = [
        "te_transferred_bytes_total": "Bytes moved by requests this process initiated, by operation, first transport and peer segment.",
        "te_served_bytes_total": "Bytes peers read from and wrote into this engine's registered memory over TCP.",
        "te_requests_total": "Requests ended (sync: transferSync; batch: submitted or transferBatchSync), by operation, transport and peer.",
        "te_slices_total": "Slices the engine handed to transports (requests cut for lanes, and failed slices resubmitted), by operation and first transport.",
        "te_request_failures_total": "Requests that ended without completing, by operation, transport, peer and reason.",
        "te_request_duration_seconds": "Time from submission to the end of a request, by operation and kind.",
        "te_requests_in_flight": "Requests submitted and not yet ended.",
        "te_failovers_total": "Requests moved to the next transport after one failed.",
        "te_connections_opened_total": "Links to peer segments opened, by transport.",
        "te_connection_failures_total": "Links to peer segments that failed to open, by transport.",
        "te_handshake_failures_total": "Refused or malformed handshake messages received.",
        "te_notifications_queued_total": "Notifications received from peers.",
        "te_notifications_dropped_total": "Notifications dropped because the queue was full.",
        "te_metadata_requests_total": "Metadata server operations, by backend, operation and result.",
        "te_metadata_request_duration_seconds": "Duration of metadata server operations, by backend and operation.",
        "te_device_bytes_total": "Bytes plugin devices moved for requests this process initiated, by transport, device and operation.",
        "te_device_errors_total": "Failed operations on plugin devices, by transport and device.",
        "te_device_inflight_bytes": "Bytes handed to plugin devices and not yet finished, by transport and device.",
        "te_metadata_server_requests_total": "Requests the embedded HTTP metadata server answered, by method and status.",
    ]

    private func descriptor(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: Self.help[name] ?? "Transfer engine metric \(name).")
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        dimensions.isEmpty ? registry.makeCounter(descriptor: descriptor(label)) : registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        dimensions.isEmpty ? registry.makeCounter(descriptor: descriptor(label)) : registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        dimensions.isEmpty ? registry.makeGauge(descriptor: descriptor(label)) : registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        dimensions.isEmpty ? registry.makeGauge(descriptor: descriptor(label)) : registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        SecondsTimer(histogram: histogram(label, dimensions))
    }

    /// The histogram of seconds a timer records into, for callers that record straight into it.
    func histogram(_ label: String, _ dimensions: [(String, String)]) -> ValueHistogram {
        dimensions.isEmpty ? registry.makeValueHistogram(descriptor: descriptor(label), buckets: buckets)
            : registry.makeValueHistogram(descriptor: descriptor(label), labels: dimensions, buckets: buckets)
    }

    // Handles live as long as the registry: nothing is unregistered.
    func destroyCounter(_ handler: any CounterHandler) {}
    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {}
    func destroyRecorder(_ handler: any RecorderHandler) {}
    func destroyMeter(_ handler: any MeterHandler) {}
    func destroyTimer(_ handler: any TimerHandler) {}
}

/// A timer recording seconds into a value histogram.
final class SecondsTimer: TimerHandler, Sendable {
    let histogram: ValueHistogram

    init(histogram: ValueHistogram) { self.histogram = histogram }

    func recordNanoseconds(_ duration: Int64) { histogram.record(Double(duration) / 1e9) }
}
