import Foundation
import Logging
@testable import TransferEngine

/// Paths and helpers shared by the tests.
enum TestSupport {
    /// The repository root (from this file's path).
    static let repoRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The build products directory (holds the `transfer-engine` binary next to the test bundle).
    static let productsDirectory: URL = {
        if let override = ProcessInfo.processInfo.environment["TE_TEST_PRODUCTS_DIR"] { return URL(fileURLWithPath: override) }
        var url = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        // XCTest bundles on Linux sit directly in the products dir; be tolerant of nesting.
        for _ in 0..<3 where !FileManager.default.fileExists(atPath: url.appendingPathComponent("transfer-engine").path) {
            url.deleteLastPathComponent()
        }
        return url
    }()

    /// The CLI binary.
    static var cli: String { productsDirectory.appendingPathComponent("transfer-engine").path }

    /// A free TCP port on 127.0.0.1 outside the kernel's ephemeral range (32768+) and the
    /// engine's listener range (15000-17000), so an outgoing connection cannot take it meanwhile.
    static func freePort() throws -> UInt16 {
        for _ in 0..<200 {
            let candidate = UInt16.random(in: 20000...29999)
            if let probe = try? Socket.listen(host: "127.0.0.1", port: candidate) {
                probe.close()
                return candidate
            }
        }
        throw TestFailure("no free port in 20000-29999")
    }

    /// A fresh temporary directory.
    static func temporaryDirectory(_ prefix: String = "te-test") throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// An environment without the variables that would change engine behaviour.
    static func cleanEnvironment(_ extra: [String: String] = [:]) -> [String: String] {
        var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("MC_") && !$0.key.hasPrefix("MOONCAKE_") }
        environment["MC_TRANSPORT_PLUGIN_PATH"] = "/nonexistent-plugin-dir"
        for (key, value) in extra { environment[key] = value }
        return environment
    }

    /// A logger that records every message (for asserting on warnings).
    static func capturingLogger() -> (Logger, LogCapture) {
        let capture = LogCapture()
        let logger = Logger(label: "test") { _ in CapturingLogHandler(capture: capture) }
        return (logger, capture)
    }

    /// Runs a command and returns (exit status, stdout, stderr). Bounded by `timeout` seconds.
    @discardableResult
    static func run(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, timeout: TimeInterval = 120) throws -> (Int32, String, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let outData = LockedData(), errData = LockedData()
        let group = DispatchGroup()
        for (pipe, sink) in [(out, outData), (err, errData)] {
            group.enter()
            DispatchQueue.global().async {
                sink.set(pipe.fileHandleForReading.readDataToEndOfFile())
                group.leave()
            }
        }
        if group.wait(timeout: .now() + timeout) == .timedOut {
            process.terminate()
            throw TestFailure("\(executable) \(arguments.joined(separator: " ")) did not finish in \(timeout) s")
        }
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: outData.get(), as: UTF8.self), String(decoding: errData.get(), as: UTF8.self))
    }
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func set(_ value: Data) { lock.withLock { data = value } }
    func get() -> Data { lock.withLock { data } }
}

/// A test failure with a message.
struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Collected log lines.
final class LogCapture: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [(Logger.Level, String)] = []
    func append(_ level: Logger.Level, _ message: String) { lock.withLock { lines.append((level, message)) } }
    func messages(at level: Logger.Level) -> [String] { lock.withLock { lines.filter { $0.0 == level }.map(\.1) } }
}

struct CapturingLogHandler: LogHandler {
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { capture.append(event.level, "\(event.message)") }
}

/// Page-aligned memory owned by a test.
final class TestBuffer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let count: Int
    init(_ count: Int, fill: UInt8 = 0) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
        memset(pointer, Int32(fill), count)
    }
    deinit { pointer.deallocate() }
    var address: UInt64 { UInt64(UInt(bitPattern: pointer)) }
    var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: count) }
    /// Fills with a position- and seed-dependent pattern.
    func fillPattern(seed: UInt8) {
        let p = pointer.assumingMemoryBound(to: UInt8.self)
        for i in 0..<min(count, 4093) { p[i] = UInt8(truncatingIfNeeded: i &* 31 &+ Int(seed)) }
        var filled = min(count, 4093)
        while filled < count {
            let chunk = min(filled, count - filled)
            memcpy(p + filled, p, chunk)
            filled += chunk
        }
    }
    func equals(_ other: TestBuffer, offset: Int = 0, otherOffset: Int = 0, length: Int) -> Bool {
        memcmp(pointer + offset, other.pointer + otherOffset, length) == 0
    }
}

/// A `transfer-engine serve` child process: a real second engine process.
final class ServeProcess: @unchecked Sendable {
    let process = Process()
    let input = Pipe()
    private let output = Pipe()
    /// Output after the lines read so far (READY, then `command`'s answers).
    private var pending = ""
    let segment: String
    let bufferAddress: UInt64
    let bufferLength: UInt64
    /// Every key=value field of the READY line.
    let ready: [String: String]

    /// `launcher` runs the CLI through another command (e.g. `ip netns exec NAME`).
    init(bufferSize: String = "128MiB", environment: [String: String] = TestSupport.cleanEnvironment(), protocolName: String = "tcp",
         deviceName: String? = nil, localHostname: String = "127.0.0.1", launcher: [String] = [], commands: Bool = false) throws {
        let command = launcher + [TestSupport.cli]
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
            + ["serve", "--exit-on-stdin-close", "--buffer-size", bufferSize, "--local-hostname", localHostname, "--protocol", protocolName]
            + (deviceName.map { ["--device-name", $0] } ?? []) + (commands ? ["--commands"] : [])
        process.environment = environment
        process.standardInput = input
        process.standardOutput = output
        // Its log goes to an unlinked file, read back only to say why it did not start.
        let log = Self.unlinkedFile()
        process.standardError = log?.write ?? FileHandle.nullDevice
        try process.run()
        try? log?.write.close()
        var unread = ""
        // A serve that fails exits at once; a slow start (a TCG guest beside another test's
        // processes took over 30 s) only waits longer.
        let readyLine = Self.nextLine(from: output.fileHandleForReading, unread: &unread, seconds: 120)
        pending = unread
        let fields = Self.readyFields(readyLine ?? "")
        guard let segment = fields["segment"], let buffer = fields["buffer"], let address = UInt64(buffer.dropFirst(2), radix: 16),
              let length = fields["length"].flatMap({ UInt64($0) }) else {
            process.terminate()
            process.waitUntilExit()
            let logged = log.map { String(decoding: $0.read.readDataToEndOfFile().suffix(2000), as: UTF8.self) } ?? ""
            throw TestFailure("serve did not print READY: \(readyLine ?? unread) (exit status \(process.terminationStatus); its log ends: \(logged))")
        }
        self.segment = segment
        self.bufferAddress = address
        self.bufferLength = length
        self.ready = fields
    }

    /// Sends one `serve --commands` line and returns its one-line answer (started with `commands`),
    /// waiting at most 30 s for it.
    func command(_ line: String) throws -> String {
        signal(SIGPIPE, SIG_IGN)  // a child that exited fails the write, not the test process
        try input.fileHandleForWriting.write(contentsOf: Data((line + "\n").utf8))
        guard let answer = Self.nextLine(from: output.fileHandleForReading, unread: &pending) else {
            throw TestFailure("serve did not answer '\(line)': \(pending)")
        }
        return answer
    }

    /// The next line of `handle`'s output (without its newline), waiting at most `seconds` for it;
    /// `unread` holds what arrived past the lines returned so far. Nil at end of output or timeout.
    private static func nextLine(from handle: FileHandle, unread: inout String, seconds: TimeInterval = 30) -> String? {
        let deadline = Date().addingTimeInterval(seconds)
        while !unread.contains("\n") {
            let left = deadline.timeIntervalSinceNow
            var ready = pollfd(fd: handle.fileDescriptor, events: Int16(POLLIN), revents: 0)
            guard left > 0, poll(&ready, 1, Int32(left * 1000)) > 0 else { break }
            let chunk = handle.availableData
            if chunk.isEmpty { break }
            unread += String(decoding: chunk, as: UTF8.self)
        }
        guard let end = unread.firstIndex(of: "\n") else { return nil }
        defer { unread = String(unread[unread.index(after: end)...]) }
        return String(unread[..<end])
    }

    /// A temporary file already unlinked, open for writing (for the child) and reading (for us).
    private static func unlinkedFile() -> (write: FileHandle, read: FileHandle)? {
        var template = Array((NSTemporaryDirectory() + "/te-serve-log.XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { return nil }
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        guard let read = FileHandle(forReadingAtPath: path) else { close(fd); return nil }
        return (FileHandle(fileDescriptor: fd, closeOnDealloc: true), read)
    }

    /// The key=value fields of serve's READY line.
    static func readyFields(_ line: String) -> [String: String] {
        var fields: [String: String] = [:]
        for part in line.split(separator: " ") {
            let kv = part.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { fields[String(kv[0])] = String(kv[1]) }
        }
        return fields
    }

    /// Kills the process abruptly (a peer that dies).
    func kill() {
        Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit {
        if process.isRunning {
            try? input.fileHandleForWriting.close()
            process.terminate()
            process.waitUntilExit()
        }
    }
}

/// Builds fixture plugins from Tests/TransferEngineTests/Fixtures with the system C compiler.
enum FixturePlugins {
    static let source = TestSupport.repoRoot.appendingPathComponent("Tests/TransferEngineTests/Fixtures/fixture_plugin.c").path
    static let include = TestSupport.repoRoot.appendingPathComponent("Sources/CTransportABI/include").path

    /// Compiles the fixture with `defines` into `directory/fileName`.
    @discardableResult
    static func build(_ fileName: String, defines: [String] = [], in directory: URL, extraArguments: [String] = []) throws -> String {
        let output = directory.appendingPathComponent(fileName).path
        let arguments = ["-shared", "-fPIC", "-O1", "-I", include] + defines.map { "-D\($0)" } + [source, "-o", output, "-lpthread"] + extraArguments
        let (status, _, stderr) = try TestSupport.run("/usr/bin/cc", arguments)
        guard status == 0 else { throw TestFailure("cc failed: \(stderr)") }
        return output
    }

    /// A plugin that links libfixturedep.so, which is then deleted (a missing dependency).
    static func buildWithMissingDependency(_ fileName: String, in directory: URL) throws -> String {
        let depDirectory = directory.appendingPathComponent("dep")
        try FileManager.default.createDirectory(at: depDirectory, withIntermediateDirectories: true)
        let depSource = depDirectory.appendingPathComponent("dep.c")
        try "int fixture_dependency_function(void) { return 1; }\n".write(to: depSource, atomically: true, encoding: .utf8)
        let depLibrary = depDirectory.appendingPathComponent("libfixturedep.so.1").path
        let (status, _, stderr) = try TestSupport.run("/usr/bin/cc", ["-shared", "-fPIC", "-Wl,-soname,libfixturedep.so.1", depSource.path, "-o", depLibrary])
        guard status == 0 else { throw TestFailure("cc failed: \(stderr)") }
        let path = try build(fileName, defines: ["FIXTURE_NEEDS_LIB"], in: directory, extraArguments: [depLibrary])
        try FileManager.default.removeItem(atPath: depLibrary)
        return path
    }
}
