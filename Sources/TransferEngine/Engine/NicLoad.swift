import Synchronization

/// One device's load, as `getNicLoadStats` reports it.
public struct NicLoad: Equatable, Sendable {
    /// The device, as its plugin names it (mlx5_0, rxe0, lo, ...).
    public var deviceName: String
    /// Bytes of requests the plugin holds on it now.
    public var inflightBytes: UInt64
    /// Its throughput (bits per second), an exponentially weighted average of the rates seen
    /// between successive calls (0 on the first).
    public var ewmaBandwidthBps: Double
}

/// One device's figures as its plugin reports them (ABI 1.2 `stats`): totals since the plugin
/// instance was created.
public struct DeviceStatistics: Equatable, Sendable {
    /// The protocol of the plugin that reports the device.
    public var transport: String
    /// The device, as its plugin names it.
    public var deviceName: String
    /// Bytes the device read from peers in operations that succeeded (pieces of requests).
    public var bytesRead: UInt64
    /// Bytes the device wrote to peers in operations that succeeded.
    public var bytesWritten: UInt64
    /// Bytes handed to the device and not yet finished.
    public var inflightBytes: UInt64
    /// Operations that failed on the device.
    public var errors: UInt64
}

/// The previous reading of each device, for the rates.
final class NicLoadTracker: Sendable {
    private struct Reading {
        var bytes: UInt64
        var at: UInt64
        /// nil until a second reading gave a rate.
        var ewma: Double?
    }

    private let readings = ConditionLock<[String: Reading]>([:])
    /// Weight of the newest rate.
    static let alpha = 0.3

    /// Loads from plugin figures read `now` (monotonic ns).
    func update(_ devices: [DeviceStatistics], now: UInt64) -> [NicLoad] {
        readings.withLock { table in
            devices.map { device in
                let key = device.transport + "/" + device.deviceName
                let total = device.bytesRead &+ device.bytesWritten
                var ewma: Double? = nil
                if let previous = table[key] {
                    ewma = previous.ewma
                    // A counter that went back (the plugin was re-created) starts over from this reading.
                    if now > previous.at, total >= previous.bytes {
                        let rate = Double(total - previous.bytes) * 8 / (Double(now - previous.at) / 1e9)
                        ewma = previous.ewma.map { Self.alpha * rate + (1 - Self.alpha) * $0 } ?? rate
                    }
                }
                if table[key] != nil || table.count < 1024 { table[key] = Reading(bytes: total, at: now, ewma: ewma) }
                return NicLoad(deviceName: device.deviceName, inflightBytes: device.inflightBytes, ewmaBandwidthBps: ewma ?? 0)
            }
        }
    }
}

extension TransferEngine {
    /// The load of every device the installed plugins report (ABI 1.2 `stats`); TCP reports none.
    public func nicLoadStats() -> [NicLoad] { nicLoad.update(deviceStatistics(), now: MonotonicClock.nanoseconds()) }

    /// The figures of every device the installed plugins report (ABI 1.2 `stats`); TCP reports none.
    public func deviceStatistics() -> [DeviceStatistics] {
        let plugins = state.withLock { $0.transports }.compactMap { $0 as? PluginTransport }
        return plugins.flatMap { plugin in
            plugin.deviceStats().map {
                DeviceStatistics(transport: plugin.protocolName, deviceName: $0.name, bytesRead: $0.bytesRead, bytesWritten: $0.bytesWritten,
                                 inflightBytes: $0.inflightBytes, errors: $0.errors)
            }
        }
    }
}
