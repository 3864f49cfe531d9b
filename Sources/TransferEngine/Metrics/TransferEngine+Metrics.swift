/// What an embedder reads of the metrics, and upstream's periodic MC_TE_METRIC line.
extension TransferEngine {
    /// Whether this engine records metrics (recording was on when it was created).
    public var recordsMetrics: Bool { metrics != nil }

    /// The process's metrics in the Prometheus text format ("" while recording is off).
    public var metricsText: String { EngineMetricsRegistry.text() }

    /// The process's metrics as JSON: `enabled`, `totals` (each metric summed over its labels) and
    /// `series` (every sample with its labels; histogram buckets left out).
    public var metricsJSON: JSONValue {
        MetricsSnapshot.json(MetricsSnapshot.parse(metricsText), enabled: metrics != nil)
    }

    /// With MC_TE_METRIC set true: one INFO line every MC_TE_METRIC_INTERVAL_SECONDS (default 5)
    /// with the throughput, requests and failures since the previous line (upstream's `[Metrics]`).
    func startMetricsReport() {
        guard metrics != nil, ProtocolSelector.truthy(environment["MC_TE_METRIC"]) else { return }
        var seconds = 5
        if let text = environment["MC_TE_METRIC_INTERVAL_SECONDS"], !text.isEmpty {
            if let value = Int(text), (1...3600).contains(value) { seconds = value } else {
                logger.warning("MC_TE_METRIC_INTERVAL_SECONDS='\(text)' is not 1...3600; using 5")
            }
        }
        let interval = UInt64(seconds) * 1_000_000_000
        do {
            let last = ConditionLock((samples: MetricsSnapshot.parse(EngineMetricsRegistry.text()), at: MonotonicClock.nanoseconds()))
            try repeatUntilShutdown(thread: "te-metrics-log", every: interval) { engine in
                let now = MonotonicClock.nanoseconds()
                let samples = MetricsSnapshot.parse(EngineMetricsRegistry.text())
                let previous = last.withLock { last in defer { last = (samples, now) }; return last }
                engine.logger.info("\(MetricsSnapshot.summary(samples, previous: previous.samples, seconds: Double(now - previous.at) / 1e9))")
            }
        } catch {
            logger.warning("cannot start the MC_TE_METRIC thread; no periodic metrics line: \(error)")
        }
    }
}
