#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CTransferEngineShims
import Logging

/// Writes one JSON object per message to standard error: `time` (UTC, microseconds), `level`,
/// `label`, `thread` (its name) and `tid`, `source`, `message`, then the metadata (for example
/// `peer`, the segment a message concerns) as string fields. One `write` per line, so lines of
/// concurrent threads do not interleave on a pipe or terminal up to PIPE_BUF (4 KiB).
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String

    public init(label: String, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider) {
        self.label = label
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        let line = JSONLogHandler.line(time: JSONLogHandler.now(), level: event.level, label: label, thread: JSONLogHandler.threadName(),
                                       tid: Int(te_thread_id()), source: event.source, message: "\(event.message)", metadata: merged)
        var bytes = Array(line.utf8)
        bytes.append(0x0A)
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(2, raw.baseAddress! + offset, raw.count - offset)
                if n <= 0 { if n < 0 && errno == EINTR { continue } else { return } }
                offset += n
            }
        }
    }

    /// One log line (without the newline); the fields in a fixed order.
    static func line(time: String, level: Logger.Level, label: String, thread: String, tid: Int, source: String, message: String,
                     metadata: Logger.Metadata) -> String {
        var fields: [(String, JSONValue)] = [("time", .string(time)), ("level", .string(level.rawValue)), ("label", .string(label)),
                                             ("thread", .string(thread)), ("tid", .int(Int64(tid))), ("source", .string(source)),
                                             ("message", .string(message))]
        let reserved = Set(fields.map(\.0))
        for key in metadata.keys.sorted() where !reserved.contains(key) { fields.append((key, .string("\(metadata[key]!)"))) }
        return "{" + fields.map { "\(JSONValue.string($0.0).compactText):\($0.1.compactText)" }.joined(separator: ",") + "}"
    }

    /// The current time as 2026-12-06T16:38:47.123456Z.
    static func now() -> String { WallClock.now(utc: true).formatted(separator: "T") + "Z" }

    static func threadName() -> String {
        var buffer = [CChar](repeating: 0, count: 32)
        te_thread_name(&buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
