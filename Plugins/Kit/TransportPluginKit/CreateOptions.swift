import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The JSON `probe` and `create` receive (te_transport_abi.h): `device_name`, `local_hostname`,
/// `segment_name`, `protocol` and the `options` object of MC_* settings.
public struct CreateOptions: Sendable {
    /// `device_name` as given ("" when absent).
    public var deviceName = ""
    /// `local_hostname` as given.
    public var localHostname = ""
    /// This engine's segment name.
    public var segmentName = ""
    /// The protocol the plugin is loaded for (ABI 1.1; "" from an older host).
    public var transportProtocol = ""
    /// The MC_* settings, by name.
    public var settings: [String: String] = [:]

    private struct Raw: Decodable {
        var device_name: String?
        var local_hostname: String?
        var segment_name: String?
        var `protocol`: String?
        var options: [String: String]?
    }

    /// The defaults (no JSON).
    public init() {}

    /// Reads `json`; nil or malformed JSON gives the defaults (probe and create judge what is missing).
    public init(json: String?) {
        guard let json, let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else {
            self.init()
            return
        }
        self.init(raw)
    }

    /// Reads `json`, refusing text that is not an options object (nil gives the defaults).
    public init(validating json: String?) throws(PluginFailure) {
        guard let json else {
            self.init()
            return
        }
        guard let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else {
            throw .invalid("options are not a JSON object with string settings")
        }
        self.init(raw)
    }

    private init(_ raw: Raw) {
        deviceName = raw.device_name ?? ""
        localHostname = raw.local_hostname ?? ""
        segmentName = raw.segment_name ?? ""
        transportProtocol = raw.protocol ?? ""
        settings = raw.options ?? [:]
    }

    /// A setting's value; nil when absent or empty.
    public func setting(_ key: String) -> String? { settings[key].flatMap { $0.isEmpty ? nil : $0 } }

    /// A numeric setting, or `fallback` when absent or not a number.
    public func number(_ key: String, _ fallback: UInt64) -> UInt64 { setting(key).flatMap { UInt64(CreateOptions.trimmed($0)) } ?? fallback }

    /// Whether a setting says yes (1, true, yes, on).
    public func flag(_ key: String) -> Bool { ["1", "true", "yes", "on"].contains((settings[key] ?? "").lowercased()) }

    /// The devices `device_name` lists (comma-separated); nil when it is empty or `auto-discovery`.
    public var requestedDevices: [String]? {
        let text = CreateOptions.trimmed(deviceName)
        guard !text.isEmpty, text != "auto-discovery" else { return nil }
        return CreateOptions.list(text)
    }

    /// The non-empty items of a comma-separated list, trimmed.
    public static func list(_ text: String) -> [String] {
        text.split(separator: ",").map { trimmed($0) }.filter { !$0.isEmpty }
    }

    /// `text` without surrounding spaces and tabs.
    public static func trimmed(_ text: some StringProtocol) -> String {
        String(text.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}

/// This boot of this host: /proc/sys/kernel/random/boot_id ("?" where it cannot be read). Handles
/// that only open on the same host (IPC handles, file pools) carry it.
public enum BootID {
    /// The boot id, read once.
    public static let current: String = read("/proc/sys/kernel/random/boot_id") ?? "?"

    /// The first line of a small text file (proc and sysfs), or nil.
    public static func read(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 256)
        guard fgets(&buffer, Int32(buffer.count), file) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
