import CoreMetrics
import Synchronization

/// The plugins' per-device figures (ABI 1.2 `stats`) as metric families, read from every live
/// engine that records metrics whenever the registry is rendered:
/// `te_device_bytes_total{transport,device,operation}`, `te_device_errors_total{transport,device}`
/// and `te_device_inflight_bytes{transport,device}`. A plugin's counters are absolute, so each
/// reading adds what grew since the previous reading of the same plugin instance; a plugin's last
/// figures are taken when its engine shuts down, so nothing it moved is lost.
enum DeviceMetrics {
    /// Most (transport, device) pairs with label values of their own; later ones share device "other".
    static let maxDeviceLabels = 64

    private struct WeakEngine {
        weak var engine: TransferEngine?
    }

    private struct Reading: Hashable {
        var plugin: ObjectIdentifier
        var device: String
    }

    private struct Totals {
        var read: UInt64 = 0
        var written: UInt64 = 0
        var errors: UInt64 = 0
    }

    private struct Handles {
        var read: Counter
        var written: Counter
        var errors: Counter
        var inflight: Meter
    }

    private struct State {
        var engines: [ObjectIdentifier: WeakEngine] = [:]
        var seen: [Reading: Totals] = [:]
        var handles: [String: Handles] = [:]
    }

    /// Held for a whole reading (the plugins' `stats` calls are local and short): two renderings
    /// at once must not interleave their readings, or an older one would look like a reset.
    private static let state = Mutex(State())

    /// Reads `engine`'s plugins at every rendering from now on (while it records metrics).
    static func track(_ engine: TransferEngine) {
        guard engine.metrics != nil else { return }
        state.withLock { $0.engines[ObjectIdentifier(engine)] = WeakEngine(engine: engine) }
    }

    /// Adds what every tracked engine's plugins moved since the last reading.
    static func refresh() {
        guard let factory = EngineMetricsRegistry.factory else { return }
        state.withLock { state in
            state.engines = state.engines.filter { $0.value.engine != nil }
            let plugins = state.engines.values.flatMap { entry -> [PluginTransport] in
                guard let engine = entry.engine else { return [] }
                return engine.state.withLock { $0.stopped ? [] : $0.transports.compactMap { $0 as? PluginTransport } }
            }
            read(plugins, into: &state, factory: factory, final: false)
        }
    }

    /// Takes the last figures of `plugins`, which are about to close, and forgets them.
    static func finish(_ plugins: [PluginTransport]) {
        guard !plugins.isEmpty, let factory = EngineMetricsRegistry.factory else { return }
        state.withLock { read(plugins, into: &$0, factory: factory, final: true) }
    }

    private static func read(_ plugins: [PluginTransport], into state: inout State, factory: some MetricsFactory, final: Bool) {
        var inflight: [String: Int64] = [:]
        for plugin in plugins {
            let key = ObjectIdentifier(plugin)
            for device in plugin.deviceStats() {
                let reading = Reading(plugin: key, device: device.name)
                let before = state.seen[reading] ?? Totals()
                let label = labelKey(plugin.protocolName, device.name, known: state.handles)
                let handles = state.handles[label] ?? makeHandles(label, factory: factory)
                state.handles[label] = handles
                // Plugin counters only grow; a smaller figure (wrapped, or a plugin's bug) adds nothing.
                if device.bytesRead > before.read { handles.read.increment(by: Int64(clamping: device.bytesRead - before.read)) }
                if device.bytesWritten > before.written { handles.written.increment(by: Int64(clamping: device.bytesWritten - before.written)) }
                if device.errors > before.errors { handles.errors.increment(by: Int64(clamping: device.errors - before.errors)) }
                if final {
                    state.seen[reading] = nil
                } else {
                    state.seen[reading] = Totals(read: max(before.read, device.bytesRead), written: max(before.written, device.bytesWritten),
                                                 errors: max(before.errors, device.errors))
                    inflight[label, default: 0] &+= Int64(clamping: device.inflightBytes)
                }
            }
            if final { state.seen = state.seen.filter { $0.key.plugin != key } }
        }
        // The gauge is a snapshot of live plugins: a device no live plugin reports shows 0.
        if !final { for (label, handles) in state.handles { handles.inflight.set(inflight[label] ?? 0) } }
    }

    /// "transport\u{1}device", with devices past `maxDeviceLabels` folded into "other".
    private static func labelKey(_ transport: String, _ device: String, known: [String: Handles]) -> String {
        let key = transport + "\u{1}" + device
        if known[key] != nil || known.count < maxDeviceLabels { return key }
        return transport + "\u{1}other"
    }

    private static func makeHandles(_ label: String, factory: some MetricsFactory) -> Handles {
        let parts = label.split(separator: "\u{1}", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        let device: [(String, String)] = [("transport", parts[0]), ("device", parts.count > 1 ? parts[1] : "")]
        return Handles(read: Counter(label: "te_device_bytes_total", dimensions: device + [("operation", "read")], factory: factory),
                       written: Counter(label: "te_device_bytes_total", dimensions: device + [("operation", "write")], factory: factory),
                       errors: Counter(label: "te_device_errors_total", dimensions: device, factory: factory),
                       inflight: Meter(label: "te_device_inflight_bytes", dimensions: device, factory: factory))
    }
}
