import CTransportABI

/// Per-device figures a plugin reports through the ABI's `stats` entry (ABI 1.2; older plugins
/// and plugins that keep none report nothing).
struct PluginDeviceStats: Equatable, Sendable {
    var name: String
    var bytesRead: UInt64
    var bytesWritten: UInt64
    var inflightBytes: UInt64
    var errors: UInt64

    /// Most devices read from one answer, and the longest name kept (the C API's field is 64 bytes).
    static let maxDevices = 256
    static let maxNameBytes = 63

    /// Parses `{"devices":[...]}`; entries without a name or with numbers of the wrong type are
    /// skipped (the plugin's word, checked like any input).
    static func parse(_ text: String) -> [PluginDeviceStats] {
        guard let document = try? JSONValue.parse(text), case .array(let devices)? = document["devices"] else { return [] }
        return devices.prefix(maxDevices).compactMap { entry in
            guard let name = entry["name"]?.stringValue, !name.isEmpty else { return nil }
            func number(_ key: String) -> UInt64? { entry[key] == nil ? 0 : entry[key]?.uint64Value }
            guard let read = number("bytes_read"), let written = number("bytes_written"), let inflight = number("inflight_bytes"),
                  let errors = number("errors") else { return nil }
            return PluginDeviceStats(name: String(decoding: Array(name.utf8.prefix(maxNameBytes)), as: UTF8.self), bytesRead: read,
                                     bytesWritten: written, inflightBytes: inflight, errors: errors)
        }
    }
}

extension PluginTransport {
    /// The plugin's figures per device; empty when it offers none (or the call failed).
    func deviceStats() -> [PluginDeviceStats] { entered { readDeviceStats() } ?? [] }

    /// The `stats` call itself (callers make sure the instance is not destroyed under it).
    func readDeviceStats() -> [PluginDeviceStats] {
        guard let stats = d.stats else { return [] }
        var out = CStringBuffer(capacity: 4096)
        guard out.withRetry({ stats(instance, $0) }) == TE_OK else { return [] }
        return PluginDeviceStats.parse(out.string)
    }
}
