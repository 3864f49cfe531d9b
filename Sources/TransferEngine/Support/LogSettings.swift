import Logging

/// How a face of the engine logs: the level and the line format. MC_LOG_LEVEL and MC_LOG_FORMAT
/// are read here and nowhere else; a command-line flag wins over them.
public struct LogSettings: Sendable, Equatable {
    /// One line per message: swift-log's text, or one JSON object.
    public enum Format: String, Sendable, CaseIterable {
        case text, json
    }

    /// Messages below this level are dropped.
    public var level: Logger.Level
    public var format: Format

    public init(level: Logger.Level, format: Format = .text) {
        self.level = level
        self.format = format
    }

    /// The level named by `text`: trace, debug, info, notice, warning (warn), error, critical,
    /// any case; nil for anything else.
    public static func level(named text: String) -> Logger.Level? {
        switch text.lowercased() {
        case "warn": return .warning
        default: return Logger.Level(rawValue: text.lowercased())
        }
    }

    /// The settings from flags (`level`, `format`: nil when not given), else MC_LOG_LEVEL and
    /// MC_LOG_FORMAT, else `defaultLevel` and text. An unknown name throws, naming the choices.
    public static func resolve(level flag: String? = nil, format formatFlag: String? = nil, environment: [String: String],
                               defaultLevel: Logger.Level) throws -> LogSettings {
        var settings = LogSettings(level: defaultLevel)
        if let text = flag ?? environment["MC_LOG_LEVEL"].flatMap({ $0.isEmpty ? nil : $0 }) {
            guard let level = level(named: text) else {
                throw EngineError.invalidArgument("log level '\(text)' (\(flag == nil ? "MC_LOG_LEVEL" : "--log-level")) is not one of trace, debug, info, notice, warning, error, critical")
            }
            settings.level = level
        }
        if let text = formatFlag ?? environment["MC_LOG_FORMAT"].flatMap({ $0.isEmpty ? nil : $0 }) {
            guard let format = Format(rawValue: text.lowercased()) else {
                throw EngineError.invalidArgument("log format '\(text)' (\(formatFlag == nil ? "MC_LOG_FORMAT" : "--log-format")) is not text or json")
            }
            settings.format = format
        }
        return settings
    }

    /// A handler writing to standard error in this format, at this level.
    public func makeHandler(label: String) -> any LogHandler {
        switch format {
        case .text:
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        case .json:
            var handler = JSONLogHandler(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
