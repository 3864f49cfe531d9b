import ArgumentParser
import Foundation
import Logging
import Synchronization
import TransferEngine

/// The `transfer-engine` command: a thin face over the TransferEngine library.
struct TransferEngineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "transfer-engine",
        abstract: "Mooncake-compatible transfer engine: move memory between processes over TCP or a transport plugin.",
        discussion: """
        Examples:
          transfer-engine bench --loopback                  # start a target process and benchmark TCP loopback
          transfer-engine serve --local-hostname 127.0.0.1  # register a buffer and wait for peers
          transfer-engine bench --segment 127.0.0.1:15123 --operation write --block-sizes 64KiB --batch-sizes 64
          transfer-engine plugins                           # list transport plugins and whether they can run here
          MOONCAKE_PROTOCOL=rdma transfer-engine serve      # ask for RDMA; falls back to TCP with one warning
          MOONCAKE_PROTOCOL=rdma,nvmeof transfer-engine serve  # several transports; tcp is always the last resort
          transfer-engine route --segment 127.0.0.1:15123   # which transport requests to a peer take, and why

        Settings come from flags, then environment (MOONCAKE_PROTOCOL, MOONCAKE_DEVICE,
        MOONCAKE_LOCAL_HOSTNAME, MOONCAKE_TE_META_DATA_SERVER, MC_*), then the JSON file
        given by --config or MOONCAKE_CONFIG_PATH. Logging: --log-level / MC_LOG_LEVEL, --log-format / MC_LOG_FORMAT (text or json).
        """,
        version: TransferEngineVersion.string,
        subcommands: [ServeCommand.self, BenchCommand.self, BenchMetadataCommand.self, BenchRouterCommand.self, BenchMetricsCommand.self, LoadCommand.self, PluginsCommand.self, RouteCommand.self, MetadataServerCommand.self]
    )
}

/// Engine settings shared by the subcommands.
struct EngineOptions: ParsableArguments {
    @Option(help: "Host name or address this engine is reached at; listeners bind to it.")
    var localHostname: String?

    @Option(help: "Metadata service: P2PHANDSHAKE (default), etcd://h:p, redis://h:p, http://h:p/metadata.")
    var metadataServer: String?

    @Option(name: .customLong("protocol"), help: "Transport protocols, a comma list in order of preference (tcp is always last): tcp (default), rdma, efa, nvmeof, shm, nvlink, nvlink_intra, hip, barex, cxl, ascend.")
    var protocolName: String?

    @Option(help: "Devices for the plugin: comma list or auto-discovery.")
    var deviceName: String?

    @Option(help: "JSON config file (keys: local_hostname, metadata_server, protocol, device_name, ...).")
    var config: String?

    /// Resolves the configuration with flags taking precedence.
    func resolve(logger: Logger) throws -> EngineConfiguration {
        let overrides = EngineConfiguration.Overrides(localHostname: localHostname, metadataServer: metadataServer,
                                                      protocolName: protocolName, deviceName: deviceName, configPath: config)
        let (configuration, warnings) = try EngineConfiguration.resolve(overrides, environment: ProcessInfo.processInfo.environment)
        for warning in warnings { logger.warning("\(warning)") }
        return configuration
    }
}

/// `--log-level` and `--log-format`, which every command takes (over MC_LOG_LEVEL and MC_LOG_FORMAT).
struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info (default), notice, warning, error, critical (else MC_LOG_LEVEL).")
    var logLevel: String?

    @Option(help: "Log lines: text (default) or json, one object per line with time, level, thread and peer fields (else MC_LOG_FORMAT).")
    var logFormat: String?

    func validate() throws {
        do { _ = try settings() } catch let error as EngineError { throw ValidationError(error.description) }
    }

    /// The settings; problems with MC_LOG_LEVEL / MC_LOG_FORMAT are collected in `problems`.
    func settings(problems: ((String) -> Void)? = { _ in }) throws -> LogSettings {
        try LogSettings.resolve(level: logLevel, format: logFormat, environment: ProcessInfo.processInfo.environment, defaultLevel: .info,
                                environmentProblem: problems)
    }

    /// Sets up logging for this process (once) and returns the command's logger; a bad
    /// MC_LOG_LEVEL or MC_LOG_FORMAT is one warning (the flags were checked by `validate`).
    func logger() -> Logger {
        var problems: [String] = []
        let logger = CLILogging.logger((try? settings(problems: { problems.append($0) })) ?? LogSettings(level: .info))
        for problem in problems { logger.warning("\(problem)") }
        return logger
    }
}

/// Sets up swift-log once for the process: standard error, in the first settings asked for.
enum CLILogging {
    private static let once = Mutex(false)

    static func logger(_ settings: LogSettings) -> Logger {
        once.withLock { done in
            guard !done else { return }
            done = true
            LoggingSystem.bootstrap { label in settings.makeHandler(label: label) }
        }
        return Logger(label: "transfer-engine")
    }
}

/// Turns engine errors into a clean message and exit code.
func runReportingErrors(_ body: () throws -> Void) throws {
    do { try body() } catch let error as EngineError {
        FileHandle.standardError.write(Data("error: \(error.description)\n".utf8))
        throw ExitCode(2)
    }
}

signal(SIGPIPE, SIG_IGN)
TransferEngineCommand.main()
