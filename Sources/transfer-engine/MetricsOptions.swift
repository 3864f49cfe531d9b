import ArgumentParser
import Foundation
import TransferEngine
import TransferEngineMetadataServer

/// `--metrics-port` (else MC_METRICS_PORT): serve the process's metrics over HTTP, and record them.
struct MetricsOptions: ParsableArguments {
    @Option(help: "Serve metrics on this port (GET /metrics in the Prometheus format, /metrics/json, /metrics/summary, /health), bound to this engine's address (else MC_METRICS_PORT; 0: any free port).")
    var metricsPort: UInt16?

    /// The port asked for, by flag or environment; throws for a malformed MC_METRICS_PORT.
    func requestedPort() throws -> UInt16? {
        if let metricsPort { return metricsPort }
        guard let text = ProcessInfo.processInfo.environment["MC_METRICS_PORT"], !text.isEmpty else { return nil }
        guard let port = UInt16(text) else { throw EngineError.invalidConfiguration("MC_METRICS_PORT='\(text)' is not a port (0...65535)") }
        return port
    }

    /// Turns recording on and starts the endpoint on `host` when a port was asked for (before
    /// any engine is created, so engines record); prints `METRICS http://host:port/metrics`.
    func start(host: String) throws -> MetricsHTTPServer? {
        guard let port = try requestedPort() else { return nil }
        EngineMetricsRegistry.enable()
        let started = Date()
        let source = MetricsHTTPServer.Source(text: EngineMetricsRegistry.text, json: EngineMetricsRegistry.jsonText,
                                              summary: { EngineMetricsRegistry.summary(seconds: Date().timeIntervalSince(started)) })
        let server: MetricsHTTPServer
        do { server = try MetricsHTTPServer(host: host, port: port, source: source) } catch {
            throw EngineError.invalidConfiguration("cannot serve metrics on \(host):\(port) (--metrics-port / MC_METRICS_PORT): \(error)")
        }
        FileHandle.standardError.write(Data("METRICS http://\(host.contains(":") ? "[\(host)]" : host):\(server.port)/metrics\n".utf8))
        return server
    }
}

extension EngineConfiguration {
    /// Where this engine's metrics endpoint binds: its local_hostname's host (127.0.0.1 when empty).
    var metricsHost: String {
        let host = (try? HostPort.parse(localHostname).host) ?? ""
        return host.isEmpty ? "127.0.0.1" : host
    }
}
