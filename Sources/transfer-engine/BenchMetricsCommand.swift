import ArgumentParser
import Foundation
import Logging
import TransferEngine

/// `bench-metrics`: what recording metrics costs, measured in pairs of short windows.
struct BenchMetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-metrics",
        abstract: "Measure what metrics cost: one engine without and one with metrics, in alternating windows against one target.",
        discussion: """
        Two engines in this process open the same target segment: the first is created while
        metrics are off (it holds no metric handles), then metrics are turned on and the second is
        created. Each case runs --pairs pairs of --window-second windows, one per engine, the order
        alternating; a pair's ratio (with / without) is taken from two windows next to each other
        in time, so a machine whose speed drifts between rounds still gives a tight figure. Prints
        per case the median ratio with its 95% interval (order statistics of the pairs) and checks
        that the metered engine counted exactly the bytes it moved.
        Example: transfer-engine bench-metrics --loopback
        """
    )

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var engine: EngineOptions

    @Option(help: "Target segment name (host:rpc_port); its first buffer is used.")
    var segment: String?

    @Flag(help: "Start a target process on this host and measure against it.")
    var loopback = false

    @Option(help: "read, write or both.")
    var operation: String = "both"

    @Option(help: "Comma-separated block sizes.")
    var blockSizes: String = "4KiB,64KiB"

    @Option(help: "Comma-separated batch sizes (1: synchronous).")
    var batchSizes: String = "1,64"

    @Option(help: "Pairs of windows per case.")
    var pairs: Int = 30

    @Option(help: "Seconds per window.")
    var windowSeconds: Double = 0.1

    @Option(help: "Also write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        if loopback == (segment != nil) { throw ValidationError("give exactly one of --loopback or --segment NAME") }
        if !["read", "write", "both"].contains(operation) { throw ValidationError("--operation must be read, write or both") }
        if !(2...1000).contains(pairs) { throw ValidationError("--pairs must be in 2...1000") }
        if !(windowSeconds > 0 && windowSeconds <= 10) { throw ValidationError("--window-seconds must be in (0, 10]") }
    }

    func run() throws {
        try runReportingErrors { try measureAll() }
    }

    private func measureAll() throws {
        let logger = logging.logger()
        let blocks = try BenchLists.blocks(blockSizes)
        let batches = try BenchLists.batches(batchSizes, limit: 1024)
        guard blocks.allSatisfy({ $0 <= 64 << 20 }) else { throw EngineError.invalidArgument("block sizes must be in 1 B ... 64 MiB") }
        // Both engines see the same settings, without the ones that turn metrics on: the first must record nothing.
        let environment = ProcessInfo.processInfo.environment.filter { !["MC_METRICS", "MC_TE_METRIC", "MC_METRICS_PORT"].contains($0.key) }
        let configuration = try engine.resolve(logger: logger)
        let span = blocks.max()! * UInt64(batches.max()!)
        let target = loopback ? try LoopbackTarget.start(bufferSize: String(span), location: "cpu:0", configuration: configuration, environment: environment) : nil
        defer { target?.stop() }
        let segmentName = target?.segment ?? segment ?? ""
        let plain = try Side(configuration: configuration, environment: environment, logger: logger, segment: segmentName, span: span)
        defer { plain.close() }
        EngineMetricsRegistry.enable()
        let metered = try Side(configuration: configuration, environment: environment, logger: logger, segment: segmentName, span: span)
        defer { metered.close() }
        guard !plain.engine.recordsMetrics, metered.engine.recordsMetrics else {
            throw EngineError.invalidConfiguration("could not make one engine without and one with metrics")
        }

        let operations = BenchLists.operations(operation)
        var results: [[String: Any]] = []
        var rows: [[String]] = []
        for op in operations {
            for block in blocks {
                for batch in batches where block * UInt64(batch) <= metered.remoteLength {
                    let label = "\(op) \(ByteSize.format(block)) x\(batch)"
                    FileHandle.standardError.write(Data("\(label) ...\n".utf8))
                    try plain.run(op, block: block, batch: batch, seconds: windowSeconds / 4)  // warm-up: connections and lanes exist
                    try metered.run(op, block: block, batch: batch, seconds: windowSeconds / 4)
                    var off: [Double] = [], on: [Double] = []
                    for pair in 0..<pairs {
                        // The order alternates, so a drift within a pair favours neither engine.
                        let first = pair % 2 == 0 ? plain : metered, second = pair % 2 == 0 ? metered : plain
                        let a = try first.run(op, block: block, batch: batch, seconds: windowSeconds)
                        let b = try second.run(op, block: block, batch: batch, seconds: windowSeconds)
                        off.append(pair % 2 == 0 ? a.gbps : b.gbps)
                        on.append(pair % 2 == 0 ? b.gbps : a.gbps)
                    }
                    let ratios = zip(on, off).map { $0 / $1 }.sorted()
                    let (low, high) = Self.medianInterval(ratios)
                    let median = Self.median(ratios)
                    rows.append([label, String(format: "%.3f", Self.median(off.sorted())), String(format: "%.3f", Self.median(on.sorted())),
                                 String(format: "%.3f", median), String(format: "%.3f-%.3f", low, high)])
                    results.append(["operation": op.description, "block_size": block, "batch_size": batch, "pairs": pairs,
                                    "off_gbps_median": Self.median(off.sorted()), "on_gbps_median": Self.median(on.sorted()),
                                    "ratio_median": median, "ratio_95_low": low, "ratio_95_high": high, "ratios": ratios])
                }
            }
        }
        let meteredBytes = metered.movedBytes
        // The metered engine's own count must match what it moved (the plain one records nothing).
        let counted = MetricsSnapshot.sum(MetricsSnapshot.parse(EngineMetricsRegistry.text()), "te_transferred_bytes_total")
        print("\(pairs) pairs of \(windowSeconds) s windows per case; segment \(segmentName); metered engine moved \(meteredBytes) bytes, its metrics counted \(UInt64(counted))")
        print(Table.render(header: ["case", "off GB/s", "on GB/s", "on/off (median)", "95% interval"], rows: rows))
        if let json {
            let body: [String: Any] = ["segment": segmentName, "window_seconds": windowSeconds, "pairs": pairs, "results": results,
                                       "metered_bytes": meteredBytes, "counted_bytes": counted, "version": TransferEngineVersion.string]
            let data = try JSONSerialization.data(withJSONObject: body, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: json))
            FileHandle.standardError.write(Data("wrote \(json)\n".utf8))
        }
        guard UInt64(counted) == meteredBytes else {
            throw EngineError.transferFailed("the metered engine moved \(meteredBytes) bytes but its metrics counted \(UInt64(counted))")
        }
    }

    static func median(_ sorted: [Double]) -> Double {
        let n = sorted.count
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }

    /// A distribution-free 95% interval of the median: the order statistics n/2 -+ 0.98 sqrt(n)
    /// (normal approximation to the binomial), clamped to the sample.
    static func medianInterval(_ sorted: [Double]) -> (Double, Double) {
        let n = Double(sorted.count), half = 0.98 * n.squareRoot()
        let low = max(0, Int((n / 2 - half).rounded(.down))), high = min(sorted.count - 1, Int((n / 2 + half).rounded(.up)))
        return (sorted[low], sorted[high])
    }
}

/// One engine of `bench-metrics`: its own buffer, the target opened, and timed windows.
private final class Side {
    let engine: TransferEngine
    let local: UnsafeMutableRawPointer
    let span: UInt64
    let handle: SegmentHandle
    let remote: UInt64
    let remoteLength: UInt64
    private(set) var movedBytes: UInt64 = 0

    init(configuration: EngineConfiguration, environment: [String: String], logger: Logger, segment: String, span: UInt64) throws {
        engine = try TransferEngine(configuration: configuration, environment: environment, logger: logger)
        var pointer: UnsafeMutableRawPointer?
        guard posix_memalign(&pointer, 4096, Int(span)) == 0, let pointer else {
            engine.shutdown()
            throw EngineError.invalidArgument("cannot allocate \(span) bytes")
        }
        memset(pointer, 0x11, Int(span))
        (local, self.span) = (pointer, span)
        do {
            try engine.registerMemory(address: UInt64(UInt(bitPattern: pointer)), length: span)
            handle = try engine.openSegment(segment)
            guard let buffer = try engine.descriptor(of: handle).buffers.first else {
                throw EngineError.segmentUnavailable(name: segment, reason: "it has no registered buffer")
            }
            (remote, remoteLength) = (buffer.address, min(buffer.length, span))
        } catch {
            engine.shutdown()
            free(pointer)
            throw error
        }
    }

    /// Runs the case for `seconds`; bytes moved are added to `movedBytes`.
    @discardableResult
    func run(_ op: TransferRequest.Operation, block: UInt64, batch: Int, seconds: Double) throws -> (gbps: Double, iterations: Int) {
        let benchCase = BenchCase(engine: engine, op: op, block: block, batch: batch, local: UInt64(UInt(bitPattern: local)), handle: handle,
                                  remote: remote)
        let start = MonotonicClock.nanoseconds(), end = start + UInt64(seconds * 1e9)
        var iterations = 0
        var now = start
        repeat {
            try benchCase.once()
            iterations += 1
            now = MonotonicClock.nanoseconds()
        } while now < end && iterations < 10_000_000
        let bytes = block * UInt64(batch) * UInt64(iterations)
        movedBytes += bytes
        return (Double(bytes) / (Double(now - start) / 1e9) / 1e9, iterations)
    }

    func close() {
        try? engine.unregisterMemory(address: UInt64(UInt(bitPattern: local)))
        engine.shutdown()
        free(local)
    }
}
