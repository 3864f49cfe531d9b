import Foundation
import Logging
import TransferEngine

/// The two engines of the engine checks: a `serve` child owning the target and an engine in
/// this process, with source and sink buffers registered. The target is the peer's buffer that
/// routes through the checked plugin first (its serve buffer, or a range the plugin serves
/// itself, e.g. an NVMe namespace); `watch` sees the engine fall back to another transport.
final class Session: @unchecked Sendable {
    let engine: TransferEngine
    let peer: PeerProcess
    let watch: FallbackWatch
    let source = TestMemory(64 << 20)
    let sink = TestMemory(64 << 20)
    private(set) var handle: SegmentHandle
    let remote: UInt64
    let remoteLength: UInt64
    /// Whether the target is serve's registered buffer (which its commands zero and unregister).
    let targetIsServeBuffer: Bool
    private let directory: URL

    init(checker: PluginChecker, protocolName: String) throws {
        // The engines find plugins by file name: a directory of our own holds the checked file
        // under this protocol's name, ahead of every other plugin directory.
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("te-check-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        self.directory = directory
        var cleanup: [() -> Void] = [{ try? FileManager.default.removeItem(at: directory) }, { [source, sink] in source.release(); sink.release() }]
        var ready = false
        defer { if !ready { cleanup.reversed().forEach { $0() } } }
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let absolute = URL(fileURLWithPath: checker.path).standardizedFileURL.path
        try FileManager.default.createSymbolicLink(atPath: directory.appendingPathComponent("libtransport_\(protocolName).so").path,
                                                   withDestinationPath: absolute)
        var environment = checker.environment
        environment["MC_TRANSPORT_PLUGIN_PATH"] = directory.path + (environment["MC_TRANSPORT_PLUGIN_PATH"].map { ":" + $0 } ?? "")
        environment["MC_STRICT_PROTOCOL"] = "1"
        environment["MC_METRICS_PORT"] = nil  // two engines on this host: neither takes the checker's metrics port
        environment["MC_TRANSFER_TIMEOUT"] = environment["MC_TRANSFER_TIMEOUT"] ?? "5"
        let peer = try PeerProcess(executable: checker.executable, protocolName: protocolName, deviceName: checker.deviceName, environment: environment)
        self.peer = peer
        cleanup.append { peer.kill() }
        let watch = FallbackWatch(echoLevel: environment["TE_CHECK_LOG"].flatMap { Logger.Level(rawValue: $0.lowercased()) })
        self.watch = watch
        let logger = Logger(label: "plugin-check") { _ in watch }
        let configuration = EngineConfiguration(localHostname: "127.0.0.1", protocolName: protocolName, deviceName: checker.deviceName)
        let engine = try TransferEngine(configuration: configuration, environment: environment, logger: logger)
        self.engine = engine
        cleanup.append { engine.shutdown() }
        guard engine.activeProtocol == protocolName else { throw CheckFailure("the engine runs \(engine.activeProtocol), not \(protocolName)") }
        try engine.registerMemory(address: source.address, length: UInt64(source.count), location: "cpu:0")
        try engine.registerMemory(address: sink.address, length: UInt64(sink.count), location: "cpu:0")
        handle = try engine.openSegment(peer.segment)
        let routes = try engine.routes(segment: handle)
        let through = routes.filter { $0.order.first?.protocolName == protocolName }
        guard let target = through.first(where: { $0.address == peer.address }) ?? through.first else {
            let seen = routes.map { "0x\(String($0.address, radix: 16)) via \($0.order.map(\.protocolName).joined(separator: ","))" }.joined(separator: "; ")
            throw CheckFailure("no buffer of the peer routes through \(protocolName) (\(seen)); the plugin's register_memory may send peers to another transport")
        }
        (remote, remoteLength, targetIsServeBuffer) = (target.address, target.length, target.address == peer.address)
        ready = true
    }

    /// Takes the peer's current descriptor (after it registered again).
    func reopen() throws {
        try engine.refreshSegment(handle)
    }

    /// Submits `requests` in one batch and waits; throws unless every one completed with its bytes.
    func runBatch(_ requests: [TransferRequest]) throws {
        let batch = try engine.allocateBatch(capacity: requests.count)
        defer { try? engine.freeBatch(batch) }
        try engine.submit(requests, to: batch)
        guard try engine.wait(batch: batch, timeoutNs: 30_000_000_000) else { throw CheckFailure("a batch of \(requests.count) did not end within 30 s") }
        let statuses = try engine.statuses(batch: batch)
        if let bad = zip(statuses, requests).first(where: { $0.0.state != .completed || $0.0.transferredBytes != $0.1.length }) {
            throw CheckFailure("a request of \(bad.1.length) bytes ended \(bad.0.state) with \(bad.0.transferredBytes) bytes: \(bad.0.error ?? "")")
        }
    }

    func close() {
        engine.shutdown()
        peer.kill()
        source.release()
        sink.release()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// The `serve` child: its READY line, and the commands it takes on standard input.
final class PeerProcess: @unchecked Sendable {
    let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private(set) var segment = ""
    private(set) var address: UInt64 = 0
    private(set) var length: UInt64 = 0

    init(executable: String, protocolName: String, deviceName: String, environment: [String: String]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["serve", "--exit-on-stdin-close", "--commands", "--buffer-size", "64MiB", "--local-hostname", "127.0.0.1",
                             "--protocol", protocolName] + (deviceName.isEmpty ? [] : ["--device-name", deviceName])
        process.environment = environment
        process.standardInput = input
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        guard let line = Self.readLine(output, timeout: 60), line.hasPrefix("READY") else {
            kill()
            throw CheckFailure("serve did not start (is the plugin usable with these settings? run `transfer-engine serve --protocol \(protocolName)` to see why)")
        }
        var fields: [String: String] = [:]
        for part in line.split(separator: " ") {
            let pair = part.split(separator: "=", maxSplits: 1)
            if pair.count == 2 { fields[String(pair[0])] = String(pair[1]) }
        }
        guard let segment = fields["segment"], let buffer = fields["buffer"], let address = UInt64(buffer.dropFirst(2), radix: 16),
              let length = fields["length"].flatMap({ UInt64($0) }), fields["protocol"] == protocolName else {
            kill()
            throw CheckFailure("serve's READY line is not what was expected: \(line)")
        }
        (self.segment, self.address, self.length) = (segment, address, length)
    }

    /// Sends one command line and returns the answer line (nil after 30 s or when the process is gone).
    func command(_ text: String) -> String? {
        guard process.isRunning, (try? input.fileHandleForWriting.write(contentsOf: Data((text + "\n").utf8))) != nil else { return nil }
        return Self.readLine(output, timeout: 30)
    }

    func kill() {
        if process.isRunning { Foundation.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// One line of `pipe`, read a byte at a time (the rest stays for the next command), or nil at the deadline or end.
    private static func readLine(_ pipe: Pipe, timeout: TimeInterval) -> String? {
        let fd = pipe.fileHandleForReading.fileDescriptor
        let deadline = Date().addingTimeInterval(timeout)
        var bytes: [UInt8] = []
        while Date() < deadline {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 100) >= 0 else { return nil }
            if poller.revents == 0 { continue }
            var byte: UInt8 = 0
            guard read(fd, &byte, 1) == 1 else { return nil }
            if byte == 10 { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(byte)
        }
        return nil
    }
}

/// Page-aligned memory for source and sink buffers.
final class TestMemory: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<UInt8>
    let count: Int
    var address: UInt64 { UInt64(UInt(bitPattern: pointer)) }

    init(_ count: Int) {
        var memory: UnsafeMutableRawPointer?
        precondition(posix_memalign(&memory, 4096, count) == 0)
        pointer = memory!.bindMemory(to: UInt8.self, capacity: count)
        self.count = count
        memset(pointer, 0, count)
    }

    /// A pattern over the first `length` bytes (all by default): 251 bytes, then copies of them.
    func fill(seed: UInt8, length: Int? = nil) {
        let total = min(length ?? count, count)
        for i in 0..<min(total, 251) { pointer[i] = UInt8(truncatingIfNeeded: (i &* 131 &+ Int(seed)) % 251) }
        var filled = min(total, 251)
        while filled < total {
            let chunk = min(filled, total - filled)
            memcpy(pointer + filled, pointer, chunk)
            filled += chunk
        }
    }
    func clear(_ length: Int) { memset(pointer, 0, min(length + 3 * 4097, count)) }
    func equals(_ other: TestMemory, _ length: Int) -> Bool { memcmp(pointer, other.pointer, length) == 0 }
    func release() { free(pointer) }
}

/// A log handler that keeps the lines in which the engine gives up on a transport for a peer
/// ("cannot reach", "failing over"): in the checks, requests must go through the plugin.
final class FallbackWatch: LogHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var seen: [String] = []
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level
    /// Set (TE_CHECK_LOG=debug, info, ...): the engine's log lines at this level and above go to stderr too.
    private let echoLevel: Logger.Level?

    init(echoLevel: Logger.Level?) {
        logLevel = min(echoLevel ?? .info, .info)
        self.echoLevel = echoLevel
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let text = "\(event.message)"
        if let echoLevel, event.level >= echoLevel { FileHandle.standardError.write(Data("check engine: \(event.level): \(text)\n".utf8)) }
        guard text.contains(" cannot reach ") || text.contains("failing over") else { return }
        lock.withLock { seen.append(text) }
    }

    /// The fallbacks since the last call, cleared.
    func take() -> [String] { lock.withLock { defer { seen.removeAll() }; return seen } }
}
