import ArgumentParser
import Foundation
import TransferEngine
import TransferEngineMetadataServer

/// `bench-metadata`: first-operation latency per metadata backend and HTTP metadata server load.
struct BenchMetadataCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-metadata",
        abstract: "Measure the first transfer to a new peer through each metadata backend, and an HTTP metadata server's requests/s.",
        discussion: """
        P2PHANDSHAKE and an embedded HTTP metadata server are always measured; add --redis URL and --etcd URL for those.
        The load test runs --clients threads of PUT/GET (a connection each, as the official client) for --duration seconds.
        """
    )

    @OptionGroup var logging: LoggingOptions

    @Option(help: "A redis server to include, e.g. redis://127.0.0.1:6379.")
    var redis: String?

    @Option(help: "An etcd server to include, e.g. etcd://127.0.0.1:2379.")
    var etcd: String?

    @Option(help: "Fresh initiators per backend.")
    var rounds: Int = 5

    @Option(help: "Concurrent clients for the HTTP load test.")
    var clients: Int = 8

    @Option(help: "Seconds of HTTP load.")
    var duration: Double = 2

    @Option(help: "Also write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        if !(1...100).contains(rounds) { throw ValidationError("--rounds must be in 1...100") }
        if !(1...256).contains(clients) { throw ValidationError("--clients must be in 1...256") }
        if duration <= 0 || duration > 600 { throw ValidationError("--duration must be in (0, 600]") }
    }

    func run() throws {
        _ = logging.logger()  // the library logs with these settings too
        try runReportingErrors {
            let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
            defer { server.stop() }
            let http = "http://127.0.0.1:\(server.port)/metadata"
            let environment = ProcessInfo.processInfo.environment
            var backends = ["P2PHANDSHAKE", http]
            if let redis { backends.append(redis) }
            if let etcd { backends.append(etcd) }
            var rows: [[String]] = []
            var latencies: [[String: Any]] = []
            for backend in backends {
                FileHandle.standardError.write(Data("open latency via \(backend) ...\n".utf8))
                let result = try MetadataBenchmark.openLatency(metadataServer: backend, rounds: rounds, environment: environment)
                rows.append([backend, String(format: "%.0f", result.medianMicros), String(format: "%.0f", result.samples.max() ?? 0)])
                latencies.append(["metadata_server": backend, "median_us": result.medianMicros, "samples_us": result.samples])
            }
            print(Table.render(header: ["metadata server", "first op p50 us", "max us"], rows: rows))
            FileHandle.standardError.write(Data("HTTP metadata server load: \(clients) clients for \(duration) s ...\n".utf8))
            let load = try MetadataBenchmark.httpLoad(url: http, clients: clients, seconds: duration)
            print("HTTP metadata server: \(load.requests) requests in \(String(format: "%.2f", load.seconds)) s = "
                  + "\(String(format: "%.0f", load.requestsPerSecond)) requests/s, p50 \(String(format: "%.0f", load.medianMicros)) us, \(load.failures) failed, \(server.keyCount) keys held")
            if let json {
                let document: [String: Any] = [
                    "open_latency": latencies,
                    "http_load": ["clients": clients, "requests": load.requests, "failures": load.failures, "seconds": load.seconds,
                                  "requests_per_second": load.requestsPerSecond, "p50_us": load.medianMicros],
                ]
                try JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys]).write(to: URL(fileURLWithPath: json))
            }
            if load.failures > 0 { throw EngineError.transferFailed("\(load.failures) HTTP metadata requests failed") }
        }
    }
}
