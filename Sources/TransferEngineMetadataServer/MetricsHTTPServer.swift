import Logging

/// `--metrics-port`: the process's metrics over HTTP for Prometheus and people. `GET /metrics`
/// (the Prometheus text format, version 0.0.4), `/metrics/json`, `/metrics/summary` (one line),
/// `/health` ("OK"); anything else 404, a method other than GET 405, a body 400.
public final class MetricsHTTPServer: Sendable {
    /// Where the answers come from (read on every request).
    public struct Source: Sendable {
        public var text: @Sendable () -> String
        public var json: @Sendable () -> String
        public var summary: @Sendable () -> String

        public init(text: @escaping @Sendable () -> String, json: @escaping @Sendable () -> String, summary: @escaping @Sendable () -> String) {
            self.text = text
            self.json = json
            self.summary = summary
        }
    }

    private let server: HTTPListener

    /// The bound port.
    public var port: UInt16 { server.port }

    /// Binds host:port (0 = any free port) and serves `source`.
    public init(host: String, port: UInt16, source: Source, logger: Logger = Logger(label: "transfer-engine.metrics")) throws {
        server = try HTTPListener(host: host, port: port, responder: MetricsAnswers(source: source), maxConnections: 256, maxPerAddress: 32,
                                  logger: logger)
    }

    /// Stops serving.
    public func stop() { server.stop() }
}

/// The answers of the metrics endpoint.
struct MetricsAnswers: HTTPResponder {
    let source: MetricsHTTPServer.Source
    var maxBodyBytes: Int { 0 }
    var requestTimeoutMs: Int64 { 10_000 }

    func refusal(method: String, target: String, authorization: String?, contentLength: Int?, chunked: Bool) -> (Int, [UInt8])? {
        let path = String(target.prefix { $0 != "?" })
        guard ["/metrics", "/metrics/json", "/metrics/summary", "/health"].contains(path) else {
            return (404, Array("served: /metrics, /metrics/json, /metrics/summary, /health".utf8))
        }
        guard method == "GET" else { return (405, Array("use GET".utf8)) }
        return (contentLength ?? 0) > 0 || chunked ? (400, Array("GET takes no body".utf8)) : nil
    }

    func answer(method: String, target: String, body: [UInt8], authorization: String?) -> (status: Int, body: [UInt8], contentType: String) {
        if let refused = refusal(method: method, target: target, authorization: authorization, contentLength: body.count, chunked: false) {
            return (refused.0, refused.1, "text/plain")
        }
        switch String(target.prefix { $0 != "?" }) {
        case "/metrics": return (200, Array(source.text().utf8), "text/plain; version=0.0.4; charset=utf-8")
        case "/metrics/json": return (200, Array(source.json().utf8), "application/json")
        case "/metrics/summary": return (200, Array((source.summary() + "\n").utf8), "text/plain")
        default: return (200, Array("OK".utf8), "text/plain")
        }
    }
}
