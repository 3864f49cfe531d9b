import CoreMetrics
import Synchronization

/// The plugins' per-device figures (ABI 1.2 `stats`) as metric families:
/// `te_device_bytes_total{transport,device,operation}`, `te_device_errors_total{transport,device}`
/// and `te_device_inflight_bytes{transport,device}`. Plugin instances of engines that record
/// metrics are tracked from creation; their figures are read whenever the registry is rendered
/// and a last time when the instance shuts down (after its calls drained), so nothing it counted
/// is lost. A plugin's counters are absolute: each reading adds what grew since the largest
/// figure seen from the same instance, so readings applied out of order add nothing twice.
///
/// Plugins are called, and tracked plugin objects are released, only outside this type's lock.
enum DeviceMetrics {
    /// Most (transport, device) pairs with label values of their own; later ones share device "other".
    static let maxDeviceLabels = 64

    private struct Tracked {
        weak var plugin: PluginTransport?
        let serial: UInt64
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
        var tracked: [ObjectIdentifier: Tracked] = [:]
        var nextSerial: UInt64 = 0
        /// Per tracked plugin: the largest figures seen of each device it reported last time.
        var seen: [ObjectIdentifier: [String: Totals]] = [:]
        var handles: [String: Handles] = [:]
    }

    private static let state = ConditionLock(State())

    /// Reads `plugin` from now on (its engine records metrics).
    static func track(_ plugin: PluginTransport) {
        let id = ObjectIdentifier(plugin)
        state.withLock { state in
            state.nextSerial += 1
            state.tracked[id] = Tracked(plugin: plugin, serial: state.nextSerial)
            state.seen[id] = nil  // an instance that lived at this address before
        }
    }

    /// Adds what every tracked plugin moved since it was last read, and sets the in-flight gauges.
    static func refresh() {
        guard let factory = EngineMetricsRegistry.factory else { return }
        let tracked = state.withLock { $0.tracked }
        var live: [PluginTransport] = []
        var gone: [(ObjectIdentifier, UInt64)] = []
        for (id, entry) in tracked {
            if let plugin = entry.plugin { live.append(plugin) } else { gone.append((id, entry.serial)) }
        }
        let readings = live.map { ($0, $0.deviceStats()) }
        state.withLock { state in
            for (id, serial) in gone where state.tracked[id]?.serial == serial {
                state.tracked[id] = nil
                state.seen[id] = nil
            }
            var inflight: [String: Int64] = [:]
            for (plugin, devices) in readings where state.tracked[ObjectIdentifier(plugin)] != nil {
                apply(plugin, devices, to: &state, factory: factory, inflight: &inflight)
            }
            // A snapshot of the plugins read now: a device none of them reports shows 0.
            for (label, handles) in state.handles { handles.inflight.set(inflight[label] ?? 0) }
        }
    }

    /// The last reading of a tracked plugin that is shutting down (`devices`: its figures once
    /// its calls drained; nil when they could not be read); it is forgotten afterwards.
    static func finish(_ plugin: PluginTransport, devices: [PluginDeviceStats]?) {
        let id = ObjectIdentifier(plugin)
        guard let factory = EngineMetricsRegistry.factory else { return }
        state.withLock { state in
            guard state.tracked[id] != nil else { return }
            var ignored: [String: Int64] = [:]
            if let devices { apply(plugin, devices, to: &state, factory: factory, inflight: &ignored) }
            state.tracked[id] = nil
            state.seen[id] = nil
        }
    }

    /// Counts one reading of `plugin` (lock held; no plugin call).
    private static func apply(_ plugin: PluginTransport, _ devices: [PluginDeviceStats], to state: inout State, factory: some MetricsFactory,
                              inflight: inout [String: Int64]) {
        let id = ObjectIdentifier(plugin)
        // Devices reported twice under one name are one device here (their figures summed).
        var merged: [String: PluginDeviceStats] = [:]
        for device in devices {
            if var known = merged[device.name] {
                known.bytesRead &+= device.bytesRead
                known.bytesWritten &+= device.bytesWritten
                known.inflightBytes &+= device.inflightBytes
                known.errors &+= device.errors
                merged[device.name] = known
            } else {
                merged[device.name] = device
            }
        }
        let before = state.seen[id] ?? [:]
        var after: [String: Totals] = [:]
        for (name, device) in merged {
            let seen = before[name] ?? Totals()
            let label = labelKey(plugin.protocolName, name, known: state.handles)
            let handles = state.handles[label] ?? makeHandles(label, factory: factory)
            state.handles[label] = handles
            // Counters only grow; a smaller figure (an older reading applied late, or a plugin's bug) adds nothing.
            if device.bytesRead > seen.read { handles.read.increment(by: Int64(clamping: device.bytesRead - seen.read)) }
            if device.bytesWritten > seen.written { handles.written.increment(by: Int64(clamping: device.bytesWritten - seen.written)) }
            if device.errors > seen.errors { handles.errors.increment(by: Int64(clamping: device.errors - seen.errors)) }
            after[name] = Totals(read: max(seen.read, device.bytesRead), written: max(seen.written, device.bytesWritten),
                                 errors: max(seen.errors, device.errors))
            inflight[label, default: 0] &+= Int64(clamping: device.inflightBytes)
        }
        // Only the devices of this reading are kept (at most PluginDeviceStats.maxDevices per plugin).
        state.seen[id] = after
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
