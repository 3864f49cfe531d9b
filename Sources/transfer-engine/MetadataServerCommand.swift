import ArgumentParser
import Foundation
import TransferEngine
import TransferEngineMetadataServer

/// `metadata-server`: the embedded HTTP metadata server.
struct MetadataServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metadata-server",
        abstract: "Run an HTTP metadata server compatible with the official engine's (GET/PUT/DELETE /metadata?key=K, GET /health).",
        discussion: "Engines use it with --metadata-server http://HOST:PORT/metadata. Keys live in memory until the server stops."
    )

    @OptionGroup var logging: LoggingOptions

    @Option(help: "Address to listen on.")
    var host: String = "127.0.0.1"

    @Option(help: "Port to listen on (0: any free port).")
    var port: UInt16 = 8080

    @Option(help: "Token required on PUT and DELETE as 'Authorization: Bearer TOKEN' (default: MC_METADATA_TOKEN; none: anyone may write). Engines send MC_METADATA_TOKEN.")
    var token: String?

    @Flag(help: "Require the token on GET as well.")
    var tokenForGet = false

    @OptionGroup var metrics: MetricsOptions

    func run() throws {
        try runReportingErrors {
            let logger = logging.logger()
            let server: MetadataHTTPServer
            let token = token ?? ProcessInfo.processInfo.environment["MC_METADATA_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
            if tokenForGet && token == nil { throw EngineError.invalidConfiguration("--token-for-get needs --token or MC_METADATA_TOKEN") }
            var options = MetadataHTTPServer.Options(token: token, tokenForGet: tokenForGet)
            let endpoint = try metrics.start(host: host)
            defer { endpoint?.stop() }
            if endpoint != nil {
                options.onRequest = { method, status in
                    // Methods are the client's word: unknown ones share one label value.
                    let known = ["GET", "PUT", "DELETE", "-"].contains(method) ? method : "other"
                    EngineMetricsRegistry.increment("te_metadata_server_requests_total", [("method", known), ("status", String(status))])
                }
            }
            do { server = try MetadataHTTPServer(host: host, port: port, options: options, logger: logger) } catch {
                throw EngineError.invalidConfiguration("cannot listen on \(host):\(port): \(error)")
            }
            print("READY metadata-server http://\(host.contains(":") ? "[\(host)]" : host):\(server.port)/metadata")
            fflush(nil)
            SignalSources.stopOnTermination().wait()
            server.stop()
        }
    }
}
