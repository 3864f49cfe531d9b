import CoreMetrics

/// A metadata store whose operations are counted (`te_metadata_requests_total` by backend,
/// operation and result) and timed (`te_metadata_request_duration_seconds`).
struct MeteredMetadataStore: MetadataStore {
    let inner: any MetadataStore
    let metrics: EngineMetrics
    let backend: String

    var serverDescription: String { inner.serverDescription }

    /// The store behind a metered one (itself otherwise): backends differ in TTLs and leases.
    static func unwrapped(_ store: any MetadataStore) -> any MetadataStore { (store as? MeteredMetadataStore)?.inner ?? store }

    func get(_ key: String) throws -> String? { try measured("get") { try inner.get(key) } }
    func put(_ key: String, _ value: String, ttlSeconds: Int?) throws { try measured("put") { try inner.put(key, value, ttlSeconds: ttlSeconds) } }
    func delete(_ key: String) throws { try measured("delete") { try inner.delete(key) } }

    private func measured<R>(_ operation: String, _ body: () throws -> R) throws -> R {
        let start = MonotonicClock.nanoseconds()
        func record(_ result: String) {
            metrics.count("te_metadata_requests_total", [("backend", backend), ("operation", operation), ("result", result)])
            metrics.time("te_metadata_request_duration_seconds", [("backend", backend), ("operation", operation)],
                         nanoseconds: MonotonicClock.nanoseconds() &- start)
        }
        do {
            let value = try body()
            record("ok")
            return value
        } catch {
            record("error")
            throw error
        }
    }
}
