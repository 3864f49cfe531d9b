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
    /// MC_LOG_FORMAT, else `defaultLevel` and text. An unknown name throws, naming the choices;
    /// with `environmentProblem`, an unknown name from the environment is reported there and the
    /// default kept instead (the variables may be set for another engine).
    public static func resolve(level flag: String? = nil, format formatFlag: String? = nil, environment: [String: String],
                               defaultLevel: Logger.Level, environmentProblem: ((String) -> Void)? = nil) throws -> LogSettings {
        var settings = LogSettings(level: defaultLevel)
        func refuse(_ text: String, fromFlag: Bool) throws {
            if !fromFlag, let environmentProblem { environmentProblem(text + "; ignored") } else { throw EngineError.invalidArgument(text) }
        }
        if let text = flag ?? environment["MC_LOG_LEVEL"].flatMap({ $0.isEmpty ? nil : $0 }) {
            if let level = level(named: text) { settings.level = level } else {
                try refuse("log level '\(text)' (\(flag == nil ? "MC_LOG_LEVEL" : "--log-level")) is not one of trace, debug, info, notice, warning, error, critical",
                           fromFlag: flag != nil)
            }
        }
        if let text = formatFlag ?? environment["MC_LOG_FORMAT"].flatMap({ $0.isEmpty ? nil : $0 }) {
            if let format = Format(rawValue: text.lowercased()) { settings.format = format } else {
                try refuse("log format '\(text)' (\(formatFlag == nil ? "MC_LOG_FORMAT" : "--log-format")) is not text or json", fromFlag: formatFlag != nil)
            }
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
