import ArgumentParser
import Foundation
import TransferEngine

/// One benchmark case's figures.
struct BenchResult {
    var operation: String
    var blockSize: UInt64
    var batchSize: Int
    var gbps: Double
    var p50Micros: Double
    var p99Micros: Double
    var iterations: Int
    var verified: Bool?
    /// The same case measured beside `--background-load` busy threads.
    var loaded: Loaded?

    /// Figures of the loaded pass.
    struct Loaded {
        var gbps: Double
        var p50Micros: Double
        var p99Micros: Double
        var iterations: Int
    }

    func dictionary(reference: Double?) -> [String: Any] {
        var d: [String: Any] = ["operation": operation, "block_size": blockSize, "batch_size": batchSize, "gbps": gbps,
                                "p50_us": p50Micros, "p99_us": p99Micros, "iterations": iterations]
        if let reference { d["ratio_to_stream"] = gbps * 1e9 / reference }
        if let verified { d["verified"] = verified }
        if let loaded {
            d["loaded"] = ["gbps": loaded.gbps, "p50_us": loaded.p50Micros, "p99_us": loaded.p99Micros, "iterations": loaded.iterations]
        }
        return d
    }
}

/// A `transfer-engine load` process: busy threads beside a benchmark, stopped by `stop` (or by
/// its own time limit, or when this process exits and its standard input closes).
final class BackgroundLoad {
    private let process = Process()
    private let input = Pipe()

    /// Starts `threads` busy threads for at most `seconds` and waits until they run.
    init(threads: Int, seconds: Double) throws {
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = ["load", "--threads", String(threads), "--seconds", String(format: "%.1f", min(3600, max(1, seconds))),
                             "--exit-on-stdin-close"]
        let output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        do { try process.run() } catch { throw EngineError.invalidArgument(Self.failurePrefix + "could not run: \(error)") }
        let ready = output.fileHandleForReading.availableData  // "READY ..." once the threads spin
        guard String(decoding: ready, as: UTF8.self).hasPrefix("READY") else {
            stop()
            throw EngineError.invalidArgument(Self.failurePrefix + "did not start (\(String(decoding: ready, as: UTF8.self).prefix(200)))")
        }
    }

    /// How its errors begin (`EngineError.isBackgroundLoadFailure`).
    static let failurePrefix = "the background load process "

    /// Stops the threads and waits for the process.
    func stop() {
        try? input.fileHandleForWriting.close()
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }
}

/// A file of JSON lines, each written with one `write` as soon as it is known.
final class JSONLinesFile {
    private let fd: Int32
    let path: String

    init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot write \(path): \(String(cString: strerror(errno)))") }
    }

    deinit { close(fd) }

    /// Appends one object as a line.
    func append(_ object: [String: Any]) throws {
        var data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        data.append(0x0A)
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == data.count else { throw ValidationError("cannot write \(path): \(String(cString: strerror(errno)))") }
    }
}

extension EngineError {
    /// Whether this is a `BackgroundLoad` that could not start (the loaded pass is skipped).
    var isBackgroundLoadFailure: Bool {
        if case .invalidArgument(let text) = self { return text.hasPrefix(BackgroundLoad.failurePrefix) }
        return false
    }
}
