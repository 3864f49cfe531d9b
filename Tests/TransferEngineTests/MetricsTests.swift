import Foundation
import Testing
@testable import TransferEngine
import TransferEngineMetadataServer

/// Engine metrics: exact counts after known transfers, the Prometheus text (and promtool where
/// installed), the HTTP endpoint, bounded peer labels, and the MC_TE_METRIC line.
@Suite("Metrics", .serialized)
struct MetricsTests {
    /// Two engines with recording on; the target's buffer registered.
    private func engines() throws -> (TransferEngine, TransferEngine, TestBuffer, TestBuffer) {
        EngineMetricsRegistry.enable()
        let target = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        let initiator = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count))
        try initiator.registerMemory(address: local.address, length: UInt64(local.count))
        return (target, initiator, remote, local)
    }

    private func value(_ name: String, _ labels: [String: String]) -> Double {
        MetricsSnapshot.sum(MetricsSnapshot.parse(EngineMetricsRegistry.text()), name, where: labels)
    }

    @Test("after known transfers the counters show exactly the bytes and requests moved, by operation, transport, peer and kind")
    func exactCounts() throws {
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown() }
        #expect(initiator.recordsMetrics)
        let handle = try initiator.openSegment(target.segmentName)
        let peer = target.segmentName
        let slicesBefore = value("te_slices_total", ["operation": "write", "transport": "tcp"])
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        try initiator.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 8192)
        let requests = (0..<3).map { TransferRequest(operation: .write, localAddress: local.address + UInt64($0) * 65536, segment: handle,
                                                    remoteAddress: remote.address + UInt64($0) * 65536, length: 65536) }
        try initiator.transferBatchSync(requests)
        let write = ["operation": "write", "transport": "tcp", "peer": peer]
        #expect(value("te_transferred_bytes_total", write) == Double(4096 + 3 * 65536))
        #expect(value("te_transferred_bytes_total", ["operation": "read", "peer": peer]) == 8192)
        #expect(value("te_requests_total", write.merging(["kind": "sync"]) { $1 }) == 1)
        #expect(value("te_requests_total", write.merging(["kind": "batch"]) { $1 }) == 3)
        #expect(value("te_connections_opened_total", ["transport": "tcp"]) >= 1)
        // One slice for the synchronous write, at least one for each batched one.
        #expect(value("te_slices_total", ["operation": "write", "transport": "tcp"]) - slicesBefore >= 4)
        #expect(value("te_request_duration_seconds_count", ["operation": "write", "kind": "sync"]) >= 1)
        // The target counted what it served (process-wide: at least this engine pair's bytes).
        #expect(value("te_served_bytes_total", ["operation": "write"]) >= Double(4096 + 3 * 65536))
        #expect(value("te_served_bytes_total", ["operation": "read"]) >= 8192)

        // The peer goes away: the next write fails and is counted as failed, with no bytes.
        target.shutdown()
        #expect(throws: EngineError.self) {
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        }
        #expect(value("te_request_failures_total", ["peer": peer, "operation": "write", "reason": "failed"]) == 1)
        #expect(value("te_transferred_bytes_total", write) == Double(4096 + 3 * 65536))
        #expect(value("te_requests_in_flight", [:]) >= 0)

        let json = initiator.metricsJSON
        #expect(json["enabled"] == .bool(true))
        guard case .object(let totals)? = json["totals"] else { Issue.record("no totals in \(json)"); return }
        #expect((totals["te_transferred_bytes_total"].flatMap { if case .double(let v) = $0 { v } else { nil } } ?? 0) >= Double(4096 + 8192 + 3 * 65536))
    }

    @Test("a registry kept from enable() shows the request counts once publish() ran (counts are added when the metrics are read)")
    func keptRegistry() throws {
        let kept = EngineMetricsRegistry.enable()
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown(); target.shutdown() }
        let handle = try initiator.openSegment(target.segmentName)
        let labels = ["operation": "write", "peer": target.segmentName]
        func bytes() -> Double { MetricsSnapshot.sum(MetricsSnapshot.parse(kept.emitToString()), "te_transferred_bytes_total", where: labels) }
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        EngineMetricsRegistry.publish()
        #expect(bytes() == 4096)
        try initiator.transferBatchSync([TransferRequest(operation: .write, localAddress: local.address, segment: handle,
                                                         remoteAddress: remote.address, length: 8192)])
        EngineMetricsRegistry.publish()
        #expect(bytes() == 4096 + 8192)
        #expect(kept.emitToString().contains("# TYPE te_requests_in_flight gauge"))
    }

    @Test("the scrape is valid Prometheus text (promtool check metrics, where Debian's prometheus is installed)")
    func promtool() throws {
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown(); target.shutdown() }
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        let text = initiator.metricsText
        #expect(text.contains("# TYPE te_transferred_bytes_total counter") && text.contains("te_request_duration_seconds_bucket{"))
        let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let promtool else { return }  // scripts/setup.sh installs it; elsewhere only the text checks above run
        let file = try TestSupport.temporaryDirectory().appendingPathComponent("scrape.txt")
        try text.write(to: file, atomically: true, encoding: .utf8)
        let (status, out, err) = try TestSupport.run("/bin/sh", ["-c", "\(promtool) check metrics < \(file.path)"])
        #expect(status == 0, "promtool: \(out) \(err)")
    }

    @Test("the HTTP endpoint serves /metrics, /metrics/json, /metrics/summary and /health; other paths 404, other methods 405")
    func endpoint() throws {
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown(); target.shutdown() }
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 12345)
        let server = try MetricsHTTPServer(host: "127.0.0.1", port: 0, source: .init(
            text: EngineMetricsRegistry.text, json: EngineMetricsRegistry.jsonText, summary: { EngineMetricsRegistry.summary(seconds: 1) }))
        defer { server.stop() }
        let scrape = try http(server.port, "/metrics")
        #expect(scrape.status == 200 && scrape.body.contains("te_transferred_bytes_total{operation=\"write\",transport=\"tcp\",peer=\"\(target.segmentName)\"} 12345"),
                "\(scrape.body.prefix(600))")
        #expect(try http(server.port, "/metrics/json").body.hasPrefix("{\"enabled\":true"))
        #expect(try http(server.port, "/metrics/summary").body.hasPrefix("[Metrics] Transfer Engine Stats"))
        #expect(try http(server.port, "/health").body == "OK")
        #expect(try http(server.port, "/metadata").status == 404)
        #expect(try http(server.port, "/metrics", method: "DELETE").status == 405)
    }

    @Test("a real Prometheus server scrapes the endpoint and its query returns the bytes moved (where Debian's prometheus is installed)")
    func prometheusServer() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/prometheus") else { return }  // scripts/setup.sh installs it
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown(); target.shutdown() }
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 54321)
        let server = try MetricsHTTPServer(host: "127.0.0.1", port: 0, source: .init(text: { EngineMetricsRegistry.text() }, json: { "{}" }, summary: { "" }))
        defer { server.stop() }
        let directory = try TestSupport.temporaryDirectory("te-prometheus")
        let config = directory.appendingPathComponent("prometheus.yml")
        try """
        global:
          scrape_interval: 1s
        scrape_configs:
          - job_name: te
            static_configs:
              - targets: ['127.0.0.1:\(server.port)']
        """.write(to: config, atomically: true, encoding: .utf8)
        let port = try TestSupport.freePort()
        let prometheus = Process()
        prometheus.executableURL = URL(fileURLWithPath: "/usr/bin/prometheus")
        prometheus.arguments = ["--config.file=\(config.path)", "--storage.tsdb.path=\(directory.appendingPathComponent("data").path)",
                                "--web.listen-address=127.0.0.1:\(port)"]
        prometheus.standardOutput = FileHandle.nullDevice
        prometheus.standardError = FileHandle.nullDevice
        try prometheus.run()
        defer { prometheus.terminate(); prometheus.waitUntilExit() }
        let query = "te_transferred_bytes_total%7Bpeer%3D%22\(target.segmentName.replacingOccurrences(of: ":", with: "%3A"))%22%7D"
        var answer = ""
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            if let reply = try? http(port, "/api/v1/query?query=\(query)"), reply.status == 200, reply.body.contains("\"54321\"") {
                answer = reply.body
                break
            }
            usleep(500_000)
        }
        #expect(answer.contains("\"54321\""), "Prometheus never returned the counter (last answer: \(answer))")
    }

    @Test("serve --metrics-port 0 prints its endpoint and serves it; a malformed MC_METRICS_PORT is refused")
    func serveEndpoint() throws {
        let serve = Process()
        serve.executableURL = URL(fileURLWithPath: TestSupport.cli)
        serve.arguments = ["serve", "--exit-on-stdin-close", "--local-hostname", "127.0.0.1", "--buffer-size", "1MiB", "--metrics-port", "0"]
        serve.environment = TestSupport.cleanEnvironment()
        let input = Pipe(), errors = Pipe()
        serve.standardInput = input
        serve.standardOutput = FileHandle.nullDevice
        serve.standardError = errors
        try serve.run()
        defer { try? input.fileHandleForWriting.close(); serve.waitUntilExit() }
        let reader = LineReader(errors.fileHandleForReading)
        var url: String?
        while let line = reader.line(timeout: 30) {
            if line.hasPrefix("METRICS ") { url = String(line.dropFirst(8)); break }
        }
        let endpoint = try #require(url)
        let port = try #require(UInt16(endpoint.split(separator: ":").last?.split(separator: "/").first ?? ""))
        #expect(endpoint == "http://127.0.0.1:\(port)/metrics")
        #expect(try http(port, "/health").body == "OK")
        let scrape = try http(port, "/metrics")
        #expect(scrape.status == 200 && scrape.body.contains("te_requests_in_flight"), "\(scrape.body.prefix(300))")

        let (status, _, err) = try TestSupport.run(TestSupport.cli, ["serve", "--exit-on-stdin-close"],
                                                   environment: TestSupport.cleanEnvironment(["MC_METRICS_PORT": "http"]), timeout: 60)
        #expect(status != 0 && err.contains("MC_METRICS_PORT='http' is not a port"), "\(err.suffix(300))")
    }

    @Test("closing a segment publishes and drops its meters: 20 open-write-read-close cycles leave none kept and every byte counted")
    func closedPeersDropMeters() throws {
        let (target, initiator, remote, local) = try engines()
        defer { initiator.shutdown(); target.shutdown() }
        let metrics = try #require(initiator.metrics)
        let peer = target.segmentName
        // Differences: the series is process-wide, and an earlier engine may have had this name.
        let (writtenBefore, readBefore) = (value("te_transferred_bytes_total", ["operation": "write", "peer": peer]),
                                           value("te_transferred_bytes_total", ["operation": "read", "peer": peer]))
        for _ in 0..<20 {
            let handle = try initiator.openSegment(target.segmentName)
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
            try initiator.transferBatchSync([TransferRequest(operation: .read, localAddress: local.address, segment: handle,
                                                             remoteAddress: remote.address, length: 8192)])
            #expect(metrics.meterCount >= 2)
            try initiator.closeSegment(handle)
            #expect(metrics.meterCount == 0)
        }
        #expect(value("te_transferred_bytes_total", ["operation": "write", "peer": peer]) - writtenBefore == 20 * 4096)
        #expect(value("te_transferred_bytes_total", ["operation": "read", "peer": peer]) - readBefore == 20 * 8192)
    }

    @Test("peer labels: the first 64 peers keep their names, the rest share 'other'")
    func boundedPeers() throws {
        EngineMetricsRegistry.enable()
        let metrics = try #require(EngineMetrics.make())
        let labels = (0..<70).map { metrics.peerLabel("10.0.0.\($0):1") }
        #expect(Set(labels.prefix(64)).count == 64 && labels.suffix(6).allSatisfy { $0 == "other" })
        #expect(metrics.peerLabel("10.0.0.3:1") == "10.0.0.3:1")
    }

    @Test("Prometheus text parses: labels with escapes, +Inf, comments skipped, malformed lines skipped; the summary reads rates")
    func parsing() {
        let text = "# HELP x\n# TYPE a counter\na{k=\"v\\\"q\",op=\"write\"} 3\nb 4.5\nc_bucket{le=\"+Inf\"} 7\nbroken{x=\"1\" 2\nnovalue\n"
        let samples = MetricsSnapshot.parse(text)
        #expect(samples.map(\.name) == ["a", "b", "c_bucket"])
        #expect(samples[0].labels == ["k": "v\"q", "op": "write"] && samples[0].value == 3 && samples[1].value == 4.5)
        let now = MetricsSnapshot.parse("te_transferred_bytes_total{operation=\"write\"} 30000000\nte_requests_total{operation=\"write\"} 10\n")
        let line = MetricsSnapshot.summary(now, previous: [], seconds: 2)
        #expect(line.contains("write 15.0 MB/s (10 requests, 0 failed)") && line.contains("read 0.0 MB/s"), "\(line)")
    }

    @Test("MC_TE_METRIC=1 logs a [Metrics] line every MC_TE_METRIC_INTERVAL_SECONDS")
    func periodicLine() throws {
        let (logger, capture) = TestSupport.capturingLogger()
        let engine = try TransferEngine(configuration: EngineConfiguration(),
                                        environment: TestSupport.cleanEnvironment(["MC_TE_METRIC": "1", "MC_TE_METRIC_INTERVAL_SECONDS": "1"]), logger: logger)
        defer { engine.shutdown() }
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline && !capture.messages(at: .info).contains(where: { $0.hasPrefix("[Metrics] Transfer Engine Stats (last 1.") }) {
            usleep(100_000)
        }
        #expect(capture.messages(at: .info).contains { $0.hasPrefix("[Metrics] Transfer Engine Stats") }, "\(capture.messages(at: .info))")
    }

    @Test("an engine dropped by its owner is freed at once, not an MC_TE_METRIC interval later (the thread holds it only to log)")
    func periodicThreadLetsGo() throws {
        weak var dropped: TransferEngine?
        do {
            let engine = try TransferEngine(configuration: EngineConfiguration(),
                                            environment: TestSupport.cleanEnvironment(["MC_TE_METRIC": "1", "MC_TE_METRIC_INTERVAL_SECONDS": "3600"]))
            dropped = engine
        }
        let deadline = Date().addingTimeInterval(5)
        while dropped != nil && Date() < deadline { usleep(10_000) }
        #expect(dropped == nil)
    }

    @Test("plugin device figures (ABI stats) show as te_device_* families: exact bytes each way, in flight back to 0, last figures kept at uninstall and shutdown")
    func deviceFamilies() throws {
        EngineMetricsRegistry.enable()
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_devstats.so", defines: ["FIXTURE_PROTOCOL=\"devstats\""], in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        let target = try TransferEngine(configuration: EngineConfiguration(protocolName: "devstats"), environment: environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(protocolName: "devstats"), environment: environment)
        defer { target.shutdown(); initiator.shutdown() }
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count))
        try initiator.registerMemory(address: local.address, length: UInt64(local.count))
        let device = ["transport": "devstats", "device": "fixture0"]
        let before = (value("te_device_bytes_total", device.merging(["operation": "write"]) { $1 }),
                      value("te_device_bytes_total", device.merging(["operation": "read"]) { $1 }))
        let handle = try initiator.openSegment(target.segmentName)
        try initiator.transferBatchSync((0..<4).map { TransferRequest(operation: .write, localAddress: local.address + UInt64($0) * 65536, segment: handle,
                                                                      remoteAddress: remote.address + UInt64($0) * 65536, length: 65536) })
        try initiator.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 12345)
        #expect(value("te_device_bytes_total", device.merging(["operation": "write"]) { $1 }) - before.0 == 4 * 65536)
        #expect(value("te_device_bytes_total", device.merging(["operation": "read"]) { $1 }) - before.1 == 12345)
        #expect(value("te_device_inflight_bytes", device) == 0)
        #expect(initiator.deviceStatistics().first { $0.deviceName == "fixture0" }?.bytesWritten == 4 * 65536)
        // A second scrape adds nothing; what moves after the last scrape is taken when the plugin
        // instance goes (uninstall, shutdown), and a new instance counts from its own zero.
        let written = { value("te_device_bytes_total", device.merging(["operation": "write"]) { $1 }) - before.0 }
        #expect(written() == 4 * 65536)
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 1000)
        try initiator.uninstallTransport("devstats")
        #expect(written() == 4 * 65536 + 1000)
        try initiator.installTransport("devstats")
        let again = try initiator.openSegment(target.segmentName)
        try initiator.transferSync(.write, localAddress: local.address, segment: again, remoteAddress: remote.address, length: 2000,
                                   transportHint: "devstats")
        initiator.shutdown()
        #expect(written() == 4 * 65536 + 3000)
        let help = EngineMetricsRegistry.text().split(separator: "\n").filter { $0.hasPrefix("# HELP te_device_") }
        #expect(help.count == 3, "\(help)")
    }

    /// One HTTP request to 127.0.0.1:port; its status and body.
    private func http(_ port: UInt16, _ path: String, method: String = "GET") throws -> (status: Int, body: String) {
        let socket = try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 2000)
        defer { socket.close() }
        socket.setTimeouts(receiveMs: 2000, sendMs: 2000)
        let message = HTTPWire.encode(startLine: "\(method) \(path) HTTP/1.1", headers: [("Host", "127.0.0.1"), ("Connection", "close")], body: [])
        try message.withUnsafeBytes { try socket.sendAll([$0]) }
        var buffered: [UInt8] = []
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        guard let response = try HTTPWire.read(from: socket, buffered: &buffered, deadline: deadline, callLimitMs: 2000),
              let status = Int(response.startLine[1]) else { throw TestFailure("no response from :\(port)\(path)") }
        return (status, String(decoding: response.body, as: UTF8.self))
    }
}
