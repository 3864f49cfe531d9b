import Foundation
import Testing
@testable import TransferEngine

/// The `transfer-engine` executable, run as a user would.
@Suite("transfer-engine CLI", .serialized)
struct CLITests {
    @Test("--help lists the subcommands with examples; --version prints the version")
    func help() throws {
        let (status, out, _) = try TestSupport.run(TestSupport.cli, ["--help"])
        #expect(status == 0)
        for word in ["serve", "bench", "plugins", "Examples:", "MOONCAKE_PROTOCOL"] { #expect(out.contains(word), "\(word)") }
        let (vstatus, version, _) = try TestSupport.run(TestSupport.cli, ["--version"])
        #expect(vstatus == 0 && version.trimmingCharacters(in: .whitespacesAndNewlines) == TransferEngineVersion.string)
    }

    @Test("a serve that cannot start: the tests' harness reports its exit status and the end of its log")
    func serveThatCannotStartSaysWhy() throws {
        #expect {
            _ = try ServeProcess(bufferSize: "not-a-size")
        } throws: { error in
            let text = "\(error)"
            return text.contains("exit status") && text.contains("not-a-size")
        }
    }

    @Test("plugins shows TCP built in and each found plugin's status")
    func plugins() throws {
        let directory = try TestSupport.temporaryDirectory()
        try FixturePlugins.build("libtransport_rdma.so", defines: ["FIXTURE_ABSENT", "FIXTURE_PROTOCOL=\"rdma\""], in: directory)
        try FixturePlugins.build("libtransport_broken.so", defines: ["FIXTURE_BAD_MAJOR"], in: directory)
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": directory.path])
        let (status, out, _) = try TestSupport.run(TestSupport.cli, ["plugins"], environment: environment)
        #expect(status == 0)
        #expect(out.contains("(built in)"))
        #expect(out.contains("hardware absent") && out.contains("no fixture device found"))
        #expect(out.contains("failed") && out.contains("ABI major version 99"))
    }

    @Test("bench --loopback runs, verifies bytes, writes JSON and streams JSON lines (the run, then each case)")
    func benchLoopback() throws {
        let json = try TestSupport.temporaryDirectory().appendingPathComponent("bench.json")
        let jsonLines = json.deletingLastPathComponent().appendingPathComponent("bench.jsonl")
        let (status, out, err) = try TestSupport.run(TestSupport.cli, [
            "bench", "--loopback", "--block-sizes", "4KiB,1MiB", "--batch-sizes", "1,8", "--duration", "0.1",
            "--buffer-size", "64MiB", "--verify", "--json", json.path, "--json-lines", jsonLines.path,
        ], environment: TestSupport.cleanEnvironment(), timeout: 180)
        #expect(status == 0, "stderr: \(err)")
        #expect(out.contains("GB/s") && out.contains("p50 us") && out.contains("vs stream"))
        #expect(!out.contains("MISMATCH"))
        let document = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
        let results = document?["results"] as? [[String: Any]]
        #expect(results?.count == 8)
        #expect(results?.allSatisfy { ($0["verified"] as? Bool) == true && (($0["gbps"] as? Double) ?? 0) > 0 } == true)
        let lines = try String(contentsOf: jsonLines, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        #expect(lines.count == 9)
        #expect((lines.first??["run"] as? [String: Any])?["cases"] as? Int == 8)
        #expect(lines.dropFirst().enumerated().allSatisfy { $1?["case"] as? Int == $0 + 1 && ($1?["verified"] as? Bool) == true })
    }

    @Test("bench-metrics measures an engine without and one with metrics in pairs; the metered one counted exactly its bytes")
    func benchMetrics() throws {
        let json = try TestSupport.temporaryDirectory().appendingPathComponent("metrics.json")
        let (status, out, err) = try TestSupport.run(TestSupport.cli, [
            "bench-metrics", "--loopback", "--block-sizes", "4KiB", "--batch-sizes", "1,4", "--operation", "write",
            "--pairs", "3", "--window-seconds", "0.02", "--json", json.path,
        ], environment: TestSupport.cleanEnvironment(), timeout: 180)
        #expect(status == 0, "stderr: \(err)")
        #expect(out.contains("on/off (median)") && out.contains("write 4 KiB x1") && out.contains("write 4 KiB x4"))
        let document = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
        let results = document?["results"] as? [[String: Any]]
        #expect(results?.count == 2)
        #expect(results?.allSatisfy { ($0["ratios"] as? [Double])?.count == 3 && (($0["ratio_median"] as? Double) ?? 0) > 0 } == true)
        let moved = document?["metered_bytes"] as? Int, counted = document?["counted_bytes"] as? Double
        #expect(moved != nil && moved! > 0 && counted == Double(moved!), "moved \(String(describing: moved)), counted \(String(describing: counted))")
    }

    @Test("bench --memcpy-reference: ceilings per direction, on halves of this side's buffer or (--local-heap) between it and a managed buffer")
    func benchCopyCeilings() throws {
        for heap in [false, true] {
            let json = try TestSupport.temporaryDirectory().appendingPathComponent("ceilings.json")
            let (status, out, err) = try TestSupport.run(TestSupport.cli, [
                "bench", "--loopback", "--block-sizes", "4KiB,64KiB", "--batch-sizes", "1", "--duration", "0.05", "--buffer-size", "8MiB",
                "--no-reference", "--memcpy-reference", "--json", json.path,
            ] + (heap ? ["--local-heap"] : []), environment: TestSupport.cleanEnvironment(), timeout: 120)
            #expect(status == 0, "stderr: \(err.suffix(500))")
            #expect(out.contains("memcpy x1 GB/s (ratio)") && !out.contains("ABOVE CEILING"), "\(out)")
            let document = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
            let between = document?["memcpy_copies_between"] as? String ?? ""
            #expect(heap ? between.contains("managed buffer") : between.contains("halves"), "\(between)")
            let ceilings = document?["memcpy_gbps_by_operation"] as? [String: [String: Double]] ?? [:]
            for op in ["write", "read"] {
                for block in ["4096", "65536"] { #expect((ceilings[op]?[block] ?? 0) > 0, "\(op) \(block): \(ceilings)") }
            }
        }
    }

    @Test("bench --json-lines to an unwritable path is refused before anything runs")
    func benchJSONLinesUnwritable() throws {
        let (status, _, err) = try TestSupport.run(TestSupport.cli, ["bench", "--loopback", "--json-lines", "/nonexistent/dir/x.jsonl", "--duration", "0.1"],
                                                   environment: TestSupport.cleanEnvironment(), timeout: 120)
        #expect(status != 0 && err.contains("cannot write /nonexistent/dir/x.jsonl"), "\(err.suffix(300))")
    }

    @Test("metadata-server serves the official HTTP protocol; bench-metadata reports latencies and load")
    func metadataCommands() throws {
        let port = try TestSupport.freePort()
        let server = Process()
        server.executableURL = URL(fileURLWithPath: TestSupport.cli)
        server.arguments = ["metadata-server", "--host", "127.0.0.1", "--port", String(port)]
        let output = Pipe()
        server.standardOutput = output
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer { server.terminate(); server.waitUntilExit() }
        let ready = LineReader(output.fileHandleForReading).line(timeout: 30) ?? ""
        #expect(ready == "READY metadata-server http://127.0.0.1:\(port)/metadata")
        let store = try HTTPMetadataStore(url: "http://127.0.0.1:\(port)/metadata", timeoutMs: 2000)
        try store.put("mooncake/ram/cli", "{}", ttlSeconds: nil)
        #expect(try store.get("mooncake/ram/cli") == "{}")

        let json = try TestSupport.temporaryDirectory().appendingPathComponent("meta.json")
        let (status, out, err) = try TestSupport.run(TestSupport.cli, ["bench-metadata", "--rounds", "2", "--duration", "0.3", "--clients", "4", "--json", json.path],
                                                     environment: TestSupport.cleanEnvironment(), timeout: 120)
        #expect(status == 0, "\(err)")
        #expect(out.contains("P2PHANDSHAKE") && out.contains("requests/s") && out.contains("0 failed"), "\(out)")
        let document = try JSONSerialization.jsonObject(with: Data(contentsOf: json)) as? [String: Any]
        #expect((document?["open_latency"] as? [[String: Any]])?.count == 2)
    }

    @Test("bad input gives a clear error and a non-zero exit")
    func badInput() throws {
        let environment = TestSupport.cleanEnvironment()
        let (s1, _, e1) = try TestSupport.run(TestSupport.cli, ["serve", "--protocol", "warpdrive"], environment: environment)
        #expect(s1 != 0 && e1.contains("unknown protocol 'warpdrive'") && e1.contains("rdma"))
        let (s2, _, e2) = try TestSupport.run(TestSupport.cli, ["serve", "--metadata-server", "ftp://x"], environment: environment)
        #expect(s2 != 0 && e2.contains("accepted forms"))
        let (s3, _, e3) = try TestSupport.run(TestSupport.cli, ["bench"], environment: environment)
        #expect(s3 != 0 && e3.contains("--loopback"))
        let (s4, _, e4) = try TestSupport.run(TestSupport.cli, ["bench", "--segment", "127.0.0.1:1"], environment: environment)
        #expect(s4 != 0 && e4.contains("segment '127.0.0.1:1' unavailable"))
    }

    @Test("serve lists every transport in READY; route explains the order and what is left out; bench-router prints its table")
    func routeAndProtocols() throws {
        let environment = TestSupport.cleanEnvironment(["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path])
        let target = try ServeProcess(bufferSize: "8MiB", environment: environment, protocolName: "shm")
        #expect(target.ready["protocol"] == "shm" && target.ready["protocols"] == "shm,tcp", "\(target.ready)")
        let (status, out, err) = try TestSupport.run(TestSupport.cli, ["route", "--segment", target.segment], environment: environment)
        #expect(status == 0, "\(err)")
        #expect(out.contains("installed here: tcp") && out.contains("uses  tcp: tcp is the last resort"), "\(out)")
        #expect(out.contains("not   shm: \(target.segment) offers it, but it is not installed here"), "\(out)")
        let (s2, json, _) = try TestSupport.run(TestSupport.cli, ["route", "--segment", target.segment, "--protocol", "shm", "--json",
                                                                 "--address", "0x" + String(target.bufferAddress + 10, radix: 16)],
                                                environment: environment)
        let body = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        let order = ((body?["buffers"] as? [[String: Any]])?.first?["order"] as? [[String: Any]])?.compactMap { $0["protocol"] as? String }
        #expect(s2 == 0 && order == ["shm", "tcp"], "\(json)")
        let (s3, _, e3) = try TestSupport.run(TestSupport.cli, ["route", "--segment", target.segment, "--address", "0x10"], environment: environment)
        #expect(s3 != 0 && e3.contains("not inside one registered buffer"), "\(e3)")
        let (s4, _, e4) = try TestSupport.run(TestSupport.cli, ["route", "--segment", target.segment, "--address", "nowhere"], environment: environment)
        #expect(s4 != 0 && e4.contains("--address"), "\(e4)")
        let (s5, table, _) = try TestSupport.run(TestSupport.cli, ["bench-router", "--iterations", "1000"], environment: environment)
        #expect(s5 == 0 && table.contains("plan, route kept") && table.contains("ns per request"), "\(table)")
    }
}
