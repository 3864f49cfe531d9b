import Synchronization

/// One device's figures for the ABI's `stats` entry: bytes moved each way, bytes handed to the
/// device and not yet finished, and operations that failed. Atomic adds (relaxed): the data path
/// records without a lock of its own, and `stats` reads at any time.
public final class DeviceCounters: Sendable {
    /// The device as the plugin publishes it (mlx5_0, rxe0, a libfabric domain, ...).
    public let name: String
    private let read = Atomic<UInt64>(0)
    private let written = Atomic<UInt64>(0)
    private let inflight = Atomic<UInt64>(0)
    private let failures = Atomic<UInt64>(0)

    /// Counters for the device `name`, all zero.
    public init(name: String) { self.name = name }

    /// `bytes` were handed to the device (posted).
    public func started(_ bytes: UInt64) { inflight.wrappingAdd(bytes, ordering: .relaxed) }

    /// An operation of `bytes` that `started` counted has ended; a successful one adds its
    /// bytes to its direction, a failed one counts an error.
    public func ended(_ bytes: UInt64, isWrite: Bool, succeeded: Bool) {
        inflight.wrappingSubtract(bytes, ordering: .relaxed)
        if !succeeded {
            failures.wrappingAdd(1, ordering: .relaxed)
        } else if isWrite {
            written.wrappingAdd(bytes, ordering: .relaxed)
        } else {
            read.wrappingAdd(bytes, ordering: .relaxed)
        }
    }

    /// An operation `started` counted was not performed after all (queued again): it leaves the
    /// in-flight figure and counts nothing else.
    public func withdrawn(_ bytes: UInt64) { inflight.wrappingSubtract(bytes, ordering: .relaxed) }

    /// An operation failed without having been counted as started (refused at posting, timed out
    /// while waiting to be posted).
    public func failed() { failures.wrappingAdd(1, ordering: .relaxed) }

    /// This device's entry of the `stats` JSON. In-flight bytes read between an end and its start
    /// on another thread could show as a wrapped value: reported as 0.
    public var json: String {
        let pending = inflight.load(ordering: .relaxed)
        return "{\"name\":\(JSONFragment.string(name)),\"bytes_read\":\(read.load(ordering: .relaxed)),"
            + "\"bytes_written\":\(written.load(ordering: .relaxed)),\"inflight_bytes\":\(pending > UInt64(Int64.max) ? 0 : pending),"
            + "\"errors\":\(failures.load(ordering: .relaxed))}"
    }

    /// The `stats` answer for `devices` ({"devices":[...]}).
    public static func report(_ devices: [DeviceCounters]) -> String {
        "{\"devices\":[" + devices.map(\.json).joined(separator: ",") + "]}"
    }
}
