import Foundation
import Testing
@testable import TransferEngine
@testable import TransferEngineMetadataServer

/// Runs `launch` until a server answers: a process that exits before serving (seen once for etcd
/// under full-suite load on a restart) is launched again, up to three times, before the test
/// fails with the last error; one still running when `launch` gave up is a real timeout.
func launchRetrying(_ launch: () throws -> Void, exited: () -> Bool) throws {
    var failure: Error?
    for attempt in 0..<3 {
        do {
            try launch()
            return
        } catch {
            failure = error
            guard exited() else { break }
            usleep(UInt32(500_000 * (attempt + 1)))
        }
    }
    throw failure!
}

/// A redis-server process on a free loopback port, for the tests.
final class RedisProcess: @unchecked Sendable {
    static let binary: String? = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].first { FileManager.default.isExecutableFile(atPath: $0) }
    let port: UInt16
    private var process: Process?

    init(port: UInt16? = nil) throws {
        self.port = try port ?? TestSupport.freePort()
        try start()
    }

    /// Starts redis-server (see `launchRetrying`).
    func start() throws { try launchRetrying(launch, exited: { self.process?.isRunning == false }) }

    private func launch() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(Self.binary))
        process.arguments = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if (try? Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 200)) != nil { return }
            usleep(20_000)
        }
        throw TestFailure("redis-server did not start on port \(port)")
    }

    func kill() {
        guard let process, process.isRunning else { return }
        Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { kill() }
}

/// An etcd process (Debian's etcd-server) on free loopback ports, for the tests.
final class EtcdProcess: @unchecked Sendable {
    static let binary: String? = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }
    let port: UInt16
    let peerPort: UInt16
    let directory: URL
    private var process: Process?

    init() throws {
        port = try TestSupport.freePort()
        peerPort = try TestSupport.freePort()
        directory = try TestSupport.temporaryDirectory("te-etcd")
        try start()
    }

    /// Starts etcd (see `launchRetrying`).
    func start() throws { try launchRetrying(launch, exited: { self.process?.isRunning == false }) }

    private func launch() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(Self.binary))
        let client = "http://127.0.0.1:\(port)", peer = "http://127.0.0.1:\(peerPort)"
        process.arguments = ["--data-dir", directory.path, "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default=\(peer)"]
        let log = directory.appendingPathComponent("etcd.log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let logHandle = try FileHandle(forWritingTo: log)
        process.standardOutput = logHandle
        process.standardError = logHandle
        try process.run()
        self.process = process
        let store = try EtcdMetadataStore(endpoints: ["127.0.0.1:\(port)"], timeoutMs: 500)
        let deadline = Date().addingTimeInterval(30)
        var lastError = ""
        while Date() < deadline {
            do {
                _ = try store.get("probe")  // succeeds once etcd serves (the key itself is absent)
                return
            } catch {
                lastError = "\(error)"
            }
            usleep(100_000)
        }
        let tail = (try? String(contentsOf: log, encoding: .utf8)).map { String($0.suffix(1500)) } ?? ""
        throw TestFailure("etcd did not start on port \(port) (running: \(process.isRunning), last error: \(lastError)); log: \(tail)")
    }

    func kill() {
        guard let process, process.isRunning else { return }
        Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit {
        kill()
        try? FileManager.default.removeItem(at: directory)
    }
}

@Suite("Metadata servers", .serialized)
struct MetadataTests {
    private func environment(_ extra: [String: String] = [:]) -> [String: String] {
        TestSupport.cleanEnvironment(["MC_METADATA_TTL_SECONDS": "3", "MC_METADATA_TIMEOUT_MS": "3000", "MC_TCP_BIND_ADDRESS": "127.0.0.1"].merging(extra) { $1 })
    }

    /// Two engines registered through `metadata`; the initiator writes and reads the target's buffer.
    private func transferThrough(_ metadata: String, environment: [String: String]) throws -> (TransferEngine, TransferEngine, TestBuffer) {
        let target = try TransferEngine(configuration: EngineConfiguration(localHostname: "node-a", metadataServer: metadata), environment: environment)
        let initiator = try TransferEngine(configuration: EngineConfiguration(localHostname: "node-b", metadataServer: metadata), environment: environment)
        let remote = TestBuffer(1 << 20), local = TestBuffer(1 << 20), back = TestBuffer(1 << 20)
        local.fillPattern(seed: 11)
        try target.registerMemory(address: remote.address, length: UInt64(remote.count), location: "cpu:0")
        try initiator.registerMemory(address: local.address, length: UInt64(local.count))
        try initiator.registerMemory(address: back.address, length: UInt64(back.count))
        #expect(target.segmentName == "node-a")
        let handle = try initiator.openSegment("node-a")
        try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: UInt64(local.count))
        try initiator.transferSync(.read, localAddress: back.address, segment: handle, remoteAddress: remote.address, length: UInt64(local.count))
        #expect(remote.equals(local, length: local.count) && back.equals(local, length: local.count))
        try initiator.sendNotification(TransferNotification(name: "via", message: metadata), to: handle)
        #expect(target.takeNotifications() == [TransferNotification(name: "via", message: metadata)])
        return (target, initiator, remote)
    }

    /// Probes find peers as openSegment does, through the server's rpc_meta entry: the live
    /// peer and the engine itself answer; an unknown name and a published peer that is gone (its
    /// rpc_meta names a port nobody listens on) fail with the reason.
    private func expectProbes(_ initiator: TransferEngine, store: MetadataStore, environment: [String: String]) throws {
        let keys = MetadataKeys(environment: environment)
        try initiator.probe(segmentName: "node-a")
        try initiator.probe(segmentName: initiator.segmentName)
        #expect(throws: EngineError.self) { try initiator.probe(segmentName: "node-unknown") }
        let closed = try Socket.listen(host: "127.0.0.1", port: 0)
        let port = closed.localAddress.port
        closed.close()
        try store.put(keys.rpcMeta("node-dead"), #"{"ip_or_host_name":"127.0.0.1","rpc_port":\#(port)}"#, ttlSeconds: nil)
        #expect(throws: EngineError.self) { try initiator.probe(segmentName: "node-dead") }
        try store.delete(keys.rpcMeta("node-dead"))
    }

    /// A fresh engine ("node-c") finds node-a through `url` and reads the first 4 KiB of `remote`.
    private func expectNewEngineReads(_ remote: TestBuffer, through url: String) throws {
        let third = try TransferEngine(configuration: EngineConfiguration(localHostname: "node-c", metadataServer: url), environment: environment())
        defer { third.shutdown() }
        let local = TestBuffer(4096)
        try third.registerMemory(address: local.address, length: 4096)
        let handle = try third.openSegment("node-a")
        try third.transferSync(.read, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 4096)
        #expect(local.equals(remote, length: 4096))
    }

    @Test("the embedded HTTP server answers with the official semantics")
    func httpServerSemantics() throws {
        let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
        defer { server.stop() }
        let store = try HTTPMetadataStore(url: "http://127.0.0.1:\(server.port)/metadata", timeoutMs: 2000)
        #expect(try store.get("mooncake/ram/x") == nil)
        try store.put("mooncake/ram/a b:1/c", #"{"v":1}"#, ttlSeconds: nil)
        #expect(try store.get("mooncake/ram/a b:1/c") == #"{"v":1}"#)
        try store.put("mooncake/rpc_meta/n", #"{"rpc_port":1}"#, ttlSeconds: nil)
        try store.put("mooncake/rpc_meta/n", #"{"rpc_port":1}"#, ttlSeconds: nil)  // identical body: allowed
        #expect(throws: MetadataRejection.self) { try store.put("mooncake/rpc_meta/n", #"{"rpc_port":2}"#, ttlSeconds: nil) }
        try store.delete("mooncake/rpc_meta/n")
        #expect(try store.get("mooncake/rpc_meta/n") == nil)
        #expect(server.answer(method: "GET", target: "/metadata?key=", body: []).0 == 400)
        #expect(server.answer(method: "GET", target: "/metadata", body: []).0 == 400)
        #expect(server.answer(method: "DELETE", target: "/metadata?key=missing", body: []).0 == 404)
        #expect(server.answer(method: "POST", target: "/metadata?key=k", body: []).0 == 405)
        #expect(server.answer(method: "GET", target: "/health", body: []) == (200, Array("OK".utf8)))
        // Concurrent clients on keep-alive and fresh connections.
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            for i in 0..<250 {
                do {
                    try store.put("mooncake/ram/w\(worker)-\(i)", "{\"i\":\(i)}", ttlSeconds: nil)
                    if try store.get("mooncake/ram/w\(worker)-\(i)") != "{\"i\":\(i)}" { failures.increment() }
                } catch { failures.increment() }
            }
        }
        #expect(failures.value == 0)
        #expect(server.keyCount >= 2000)
    }

    @Test("two engines find each other through the HTTP metadata server; keys follow the official layout and go at shutdown")
    func throughHTTP() throws {
        let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
        defer { server.stop() }
        let url = "http://127.0.0.1:\(server.port)/metadata"
        let (target, initiator, remote) = try transferThrough(url, environment: environment(["MC_METADATA_CLUSTER_ID": "c1"]))
        let store = try HTTPMetadataStore(url: url, timeoutMs: 2000)
        try expectProbes(initiator, store: store, environment: environment(["MC_METADATA_CLUSTER_ID": "c1"]))
        let rpc = try JSONValue.parse(try #require(try store.get("mooncake/c1/rpc_meta/node-a")))
        #expect(rpc["rpc_port"]?.uint64Value == UInt64(target.rpcPort) && rpc["ip_or_host_name"]?.stringValue == "127.0.0.1")
        let descriptor = try SegmentDescriptor.decode(try JSONValue.parse(try #require(try store.get("mooncake/c1/ram/node-a"))))
        #expect(descriptor.buffers.contains { $0.address == remote.address })
        initiator.shutdown()
        target.shutdown()
        #expect(try store.get("mooncake/c1/ram/node-a") == nil)
        #expect(try store.get("mooncake/c1/rpc_meta/node-a") == nil)
    }

    @Test("two engines through redis; the engine recovers after redis restarts",
          .enabled(if: RedisProcess.binary != nil || ProcessInfo.processInfo.environment["CI"] != nil))
    func throughRedis() throws {
        let redis = try RedisProcess()
        let url = "redis://127.0.0.1:\(redis.port)"
        let (target, initiator, remote) = try transferThrough(url, environment: environment())
        defer { target.shutdown(); initiator.shutdown() }
        let store = try RedisMetadataStore(address: "127.0.0.1:\(redis.port)", environment: [:], timeoutMs: 2000)
        #expect(try store.get("mooncake/ram/node-a") != nil)
        try expectProbes(initiator, store: store, environment: environment())
        // Restart redis empty: the engines' refresh (every TTL/3 = 1 s) puts their keys back.
        redis.kill()
        #expect(throws: EngineError.self) { _ = try initiator.openSegment("node-c") }
        try redis.start()
        var restored = false
        for _ in 0..<50 where !restored {
            usleep(100_000)
            restored = (try? store.get("mooncake/ram/node-a")) != nil
        }
        #expect(restored, "the target did not re-publish its descriptor after redis came back")
        try expectNewEngineReads(remote, through: url)
    }

    @Test("two engines through etcd with leases: a killed engine's keys expire; the engine survives an etcd restart",
          .enabled(if: EtcdProcess.binary != nil || ProcessInfo.processInfo.environment["CI"] != nil))
    func throughEtcd() throws {
        let etcd = try EtcdProcess()
        let url = "etcd://127.0.0.1:\(etcd.port)"
        let (target, initiator, remote) = try transferThrough(url, environment: environment())
        defer { target.shutdown(); initiator.shutdown() }
        let store = try EtcdMetadataStore(endpoints: ["127.0.0.1:\(etcd.port)"], timeoutMs: 2000)
        #expect(try store.get("mooncake/ram/node-a") != nil)
        try expectProbes(initiator, store: store, environment: environment())

        // A crashed engine (SIGKILL, no cleanup): its keys go with its lease after the TTL (3 s).
        var childEnvironment = environment()
        childEnvironment["MC_METADATA_TTL_SECONDS"] = "3"
        let crashing = Process()
        crashing.executableURL = URL(fileURLWithPath: TestSupport.cli)
        crashing.arguments = ["serve", "--metadata-server", url, "--local-hostname", "crash-node", "--buffer-size", "1MiB"]
        crashing.environment = childEnvironment
        let output = Pipe()
        crashing.standardOutput = output
        crashing.standardError = FileHandle.nullDevice
        try crashing.run()
        let ready = LineReader(output.fileHandleForReading).line(timeout: 30) ?? ""
        #expect(ready.hasPrefix("READY segment=crash-node"), "\(ready)")
        #expect(try store.get("mooncake/ram/crash-node") != nil)
        Foundation.kill(crashing.processIdentifier, SIGKILL)
        crashing.waitUntilExit()
        var gone = false
        for _ in 0..<100 where !gone {
            usleep(100_000)
            gone = (try? store.get("mooncake/ram/crash-node")) == .some(nil)
        }
        #expect(gone, "the crashed engine's descriptor outlived its lease")

        // etcd restarts (same data directory): the engines keep publishing and peers still connect.
        etcd.kill()
        try etcd.start()
        try expectNewEngineReads(remote, through: url)
    }

    @Test("etcd with authentication on: MC_ETCD_USERNAME/MC_ETCD_PASSWORD work; none or a wrong password fail with etcd's reason",
          .enabled(if: EtcdProcess.binary != nil || ProcessInfo.processInfo.environment["CI"] != nil))
    func etcdCredentials() throws {
        let etcd = try EtcdProcess()
        // Turn authentication on through the v3 JSON gateway: a root user with the root role.
        func post(_ path: String, _ body: String) throws -> (Int, String) {
            let socket = try Socket.connect(host: "127.0.0.1", port: etcd.port, timeoutMs: 2000)
            defer { socket.close() }
            socket.setTimeouts(receiveMs: 5000, sendMs: 5000)
            let request = HTTPWire.encode(startLine: "POST \(path) HTTP/1.1", headers: [("Host", "127.0.0.1"), ("Connection", "close")], body: Array(body.utf8))
            try request.withUnsafeBytes { try socket.sendAll([$0]) }
            var buffered: [UInt8] = []
            let response = try #require(try HTTPWire.read(from: socket, buffered: &buffered))
            return (Int(response.startLine[1]) ?? 0, String(decoding: response.body, as: UTF8.self))
        }
        #expect(try post("/v3/auth/user/add", #"{"name":"root","password":"rootpw"}"#).0 == 200)
        _ = try post("/v3/auth/role/add", #"{"name":"root"}"#)
        _ = try post("/v3/auth/user/grant", #"{"user":"root","role":"root"}"#)
        let enabled = try post("/v3/auth/enable", "{}")
        #expect(enabled.0 == 200, "\(enabled)")
        let url = "etcd://127.0.0.1:\(etcd.port)"
        let credentials = environment(["MC_ETCD_USERNAME": "root", "MC_ETCD_PASSWORD": "rootpw"])
        let (target, initiator, _) = try transferThrough(url, environment: credentials)
        initiator.shutdown()
        target.shutdown()
        for (extra, reason) in [([String: String](), "user name is empty"), (["MC_ETCD_USERNAME": "root", "MC_ETCD_PASSWORD": "wrong"], "authentication failed")] {
            do {
                _ = try TransferEngine(configuration: EngineConfiguration(localHostname: "node-x", metadataServer: url),
                                       environment: environment(extra.merging(["MC_METADATA_TIMEOUT_MS": "800"]) { $1 }))
                Issue.record("expected an error with \(extra)")
            } catch {
                #expect("\(error)".contains(reason), "\(error)")
            }
        }
        #expect(throws: EngineError.self) {
            _ = try TransferEngine(configuration: EngineConfiguration(localHostname: "node-y", metadataServer: url),
                                   environment: environment(["MC_ETCD_USERNAME": "root"]))
        }
    }

    @Test("an unreachable metadata server fails within the configured time, naming the server and the key")
    func unreachable() throws {
        let probe = try Socket.listen(host: "127.0.0.1", port: 0)
        let port = probe.localAddress.port
        probe.close()  // nothing listens there now
        for url in ["http://127.0.0.1:\(port)/metadata", "redis://127.0.0.1:\(port)", "etcd://127.0.0.1:\(port)"] {
            let started = Date()
            do {
                _ = try TransferEngine(configuration: EngineConfiguration(localHostname: "lonely", metadataServer: url),
                                       environment: environment(["MC_METADATA_TIMEOUT_MS": "800"]))
                Issue.record("\(url): expected an error")
            } catch {
                let text = "\(error)"
                #expect(text.contains("127.0.0.1:\(port)") && text.contains("mooncake/rpc_meta/lonely"), "\(text)")
            }
            #expect(Date().timeIntervalSince(started) < 5)
        }
    }
}
