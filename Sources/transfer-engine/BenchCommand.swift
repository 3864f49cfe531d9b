import ArgumentParser
import Foundation
import Logging
import TransferEngine

/// `bench`: measure transfers against a segment, or against a target process it starts itself.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmark reads and writes against a segment and print GB/s and latency percentiles.",
        discussion: """
        With --loopback, starts `transfer-engine serve` as a separate target process on the same host.
        Every case runs for --duration seconds or --max-iterations iterations, whichever comes first.
        Batch size 1 uses the synchronous path; larger batches are submitted at once and waited for.
        Unless --no-reference is given, the run also measures one plain loopback TCP stream
        (what iperf3 -P1 measures) and prints each result as a ratio to it. With --background-load N
        every case is measured again right after, beside N busy threads (a neighbour on the same
        cores, as an inference framework's own threads are), and both figures are printed.
        """
    )

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var engine: EngineOptions

    @OptionGroup var metrics: MetricsOptions

    @Option(help: "Target segment name (host:rpc_port). Its first buffer is used (its first namespace with --protocol nvmeof).")
    var segment: String?

    @Flag(help: "Allocate this side's buffer on the heap instead of as a managed buffer (which a CXL pool serves from the pool).")
    var localHeap = false

    @Option(help: "Memory location of the managed buffers (this side's and the loopback target's): cpu:0, or a GPU (cuda:0, hip:0) with a GPU plugin (cuda:0 also with rdma: GPUDirect RDMA).")
    var location: String = "cpu:0"

    @Flag(help: "Start a target process on this host and benchmark against it.")
    var loopback = false

    @Option(help: "read, write or both.")
    var operation: String = "both"

    @Option(help: "Comma-separated block sizes.")
    var blockSizes: String = "4KiB,64KiB,1MiB,4MiB,64MiB"

    @Option(help: "Comma-separated batch sizes (requests submitted together).")
    var batchSizes: String = "1,64"

    @Option(help: "Seconds per case.")
    var duration: Double = 1.0

    @Option(help: "Upper bound on iterations per case.")
    var maxIterations: Int = 200_000

    @Option(help: "TCP connections per peer (MC_TCP_LANES_PER_PEER).")
    var connections: Int?

    @Option(help: "Local buffer size (and the loopback target's).")
    var bufferSize: String = "512MiB"

    @Option(help: "Bytes the requests of a batch cycle through (offsets wrap), e.g. 8MiB to match a cache-resident reference; default: no wrapping.")
    var workingSet: String?

    @Option(help: "Also write the results as JSON to this file.")
    var json: String?

    @Option(help: "Also stream the results to this file as JSON lines: one describing the run, then one per case as it finishes (an error late in a run loses nothing).")
    var jsonLines: String?

    @Flag(help: "Check the bytes of every case by writing a pattern and reading it back.")
    var verify = false

    @Flag(help: "Skip the plain TCP stream reference measurement.")
    var noReference = false

    @Flag(help: "Also measure memcpy of each block size, the same-host ceiling: --memcpy-threads threads copying on the memory the transport copies, as warm: between halves of this side's buffer, with glibc memcpy and with cache-bypassing stores (the better counts); with --local-heap between that heap buffer and a managed buffer of this engine (which a CXL pool serves from the pool; writes copy into it, reads out of it), with glibc memcpy as the cxl plugin copies. Also one thread between fresh buffers (the ceiling where this side's buffer is device memory). Ratios are to the ceiling, and one above 1.0 is flagged as a measurement error.")
    var memcpyReference = false

    @Option(help: "Copy threads of the measured transport, for --memcpy-reference (the shm plugin's MC_SHM_WORKERS, 2 by default).")
    var memcpyThreads: Int = 1

    @Option(help: "Seconds of each copy-ceiling sample of --memcpy-reference (at least one copy): twice that before the cases, that right before and right after each case. Longer samples suit memory whose speed swings, as an emulated device's does.")
    var memcpySeconds: Double = 0.1

    @Option(help: "Measure every case twice: quiet, then beside this many busy threads (a `transfer-engine load` process started for that pass; 0: quiet only).")
    var backgroundLoad: Int = 0

    func validate() throws {
        if loopback == (segment != nil) { throw ValidationError("give exactly one of --loopback or --segment NAME") }
        if !["read", "write", "both"].contains(operation) { throw ValidationError("--operation must be read, write or both") }
        if duration <= 0 || duration > 600 { throw ValidationError("--duration must be in (0, 600] seconds") }
        if maxIterations < 1 { throw ValidationError("--max-iterations must be at least 1") }
        if let connections, !(1...64).contains(connections) { throw ValidationError("--connections must be in 1...64") }
        if !(0...256).contains(backgroundLoad) { throw ValidationError("--background-load must be in 0...256 threads") }
        if !(1...64).contains(memcpyThreads) { throw ValidationError("--memcpy-threads must be in 1...64") }
        if !(memcpySeconds > 0 && memcpySeconds <= 10) { throw ValidationError("--memcpy-seconds must be in (0, 10]") }
    }

    func run() throws {
        try runReportingErrors { try runBench() }
    }

    private func runBench() throws {
        let logger = logging.logger()
        let lines = try jsonLines.map { try JSONLinesFile(path: $0) }  // refused before anything runs
        var environment = ProcessInfo.processInfo.environment
        if let connections { environment["MC_TCP_LANES_PER_PEER"] = String(connections) }
        let configuration = try engine.resolve(logger: logger)
        let blocks = try BenchLists.blocks(blockSizes)
        let batches = try BenchLists.batches(batchSizes, limit: 4096)
        let localSize = try ByteSize.parse(bufferSize)
        let wrap = try workingSet.map { try ByteSize.parse($0) }
        if let wrap, wrap == 0 || wrap > localSize { throw EngineError.invalidArgument("--working-set must be in 1...\(localSize) bytes") }

        let target = loopback ? try LoopbackTarget.start(bufferSize: bufferSize, location: location, configuration: configuration, environment: environment) : nil
        defer { target?.stop() }
        let segmentName = target?.segment ?? segment ?? ""

        let endpoint = try metrics.start(host: configuration.metricsHost)
        defer { endpoint?.stop() }
        let transferEngine = try TransferEngine(configuration: configuration, environment: environment, logger: logger)
        defer { transferEngine.shutdown() }
        let local: UInt64
        if localHeap {
            var pointer: UnsafeMutableRawPointer?
            guard posix_memalign(&pointer, 4096, Int(localSize)) == 0, let pointer else { throw ValidationError("cannot allocate \(localSize) bytes") }
            local = UInt64(UInt(bitPattern: pointer))
            try transferEngine.registerMemory(address: local, length: localSize)
        } else {
            local = try transferEngine.allocateManagedBuffer(length: localSize, location: location)
        }
        defer {
            if localHeap {
                try? transferEngine.unregisterMemory(address: local)
                free(UnsafeMutableRawPointer(bitPattern: UInt(local)))
            } else {
                try? transferEngine.freeManagedBuffer(address: local)
            }
        }
        let localOnHost = localHeap || MemoryLocation.isHostAccessible(location)
        if localOnHost { memset(UnsafeMutableRawPointer(bitPattern: UInt(local))!, 0x11, Int(localSize)) }
        if verify && !localOnHost {
            throw ValidationError("--verify checks bytes with the CPU: add --local-heap so this side's buffer is host memory (the target's stays on \(location))")
        }

        // First operation to a new peer: open (descriptor handshake) + one 4 KiB write.
        let firstStart = MonotonicClock.nanoseconds()
        let handle = try transferEngine.openSegment(segmentName)
        let openMicros = Double(MonotonicClock.nanoseconds() - firstStart) / 1000
        // Ranges the plugin serves itself (nvmeof namespaces) name their protocol; prefer those.
        let buffers = try transferEngine.descriptor(of: handle).buffers
        guard let remote = buffers.first(where: { $0.extra["protocol"]?.stringValue == transferEngine.activeProtocol }) ?? buffers.first else {
            throw EngineError.segmentUnavailable(name: segmentName, reason: "it has no registered buffer")
        }
        try transferEngine.transferSync(.write, localAddress: local, segment: handle, remoteAddress: remote.address, length: min(4096, remote.length))
        let firstOpMicros = Double(MonotonicClock.nanoseconds() - firstStart) / 1000

        let streamReference = noReference ? nil : try StreamReference.loopbackTCP(seconds: 1.0)

        let operations = BenchLists.operations(operation)
        let limit = min(localSize / (verify ? 2 : 1), remote.length)
        var cases: [(TransferRequest.Operation, UInt64, Int)] = []
        for op in operations {
            for block in blocks {
                for batch in batches where (wrap.map { block <= min($0, limit) } ?? (block * UInt64(batch) <= limit)) { cases.append((op, block, batch)) }
            }
        }
        if cases.isEmpty { throw EngineError.invalidArgument("no case fits: block x batch must be at most \(limit) bytes (buffer sizes)") }

        // The copy ceilings on the buffers the transport copies (see CopyCeilings). With --local-heap
        // the target's buffer is another kind of memory (a CXL pool's), so a managed buffer of this
        // engine stands in for it; without one the ceiling would be heap memory's, far above a
        // device's, so the run stops instead.
        var peer: UInt64?
        defer { if let peer { try? transferEngine.freeManagedBuffer(address: peer) } }
        var ceilings = CopyCeilings(memory: nil, threads: memcpyThreads)
        if memcpyReference {
            let largest = cases.map { $0.1 }.max() ?? 0
            if localHeap, MemoryLocation.isHostAccessible(location) {
                do { peer = try transferEngine.allocateManagedBuffer(length: largest, location: location) } catch {
                    throw EngineError.invalidArgument("--memcpy-reference with --local-heap needs a managed buffer of \(largest) bytes at \(location) "
                        + "to copy to and from, and none could be allocated: \(error)")
                }
            }
            if let peer {
                ceilings = CopyCeilings(memory: .peer(local: local, peer: peer, size: largest), threads: memcpyThreads)
            } else if localOnHost {
                ceilings = CopyCeilings(memory: .halves(base: local, size: localSize), threads: memcpyThreads)
            }
            ceilings.start(blocks: blocks, seconds: 2 * memcpySeconds)
        }
        var results: [BenchResult] = []
        var failures: [String] = []
        try lines?.append(["run": ["segment": segmentName, "protocol": transferEngine.activeProtocol, "version": TransferEngineVersion.string,
                                   "first_operation_us": firstOpMicros, "open_segment_us": openMicros, "cases": cases.count,
                                   "loopback_tcp_stream_gbps": streamReference.map { $0 / 1e9 as Any } ?? NSNull()]])
        for (index, (op, block, batch)) in cases.enumerated() {
            let label = "\(op) \(ByteSize.format(block)) x\(batch)"
            FileHandle.standardError.write(Data("[\(index + 1)/\(cases.count)] \(label) ...\n".utf8))
            do {
                if memcpyReference { ceilings.sample(op, block, seconds: memcpySeconds) }
                var result = try measure(transferEngine, op: op, block: block, batch: batch, local: local, handle: handle, remote: remote.address, wrap: wrap)
                if memcpyReference { ceilings.sample(op, block, seconds: memcpySeconds) }
                if backgroundLoad > 0 {
                    // The loaded pass right after the quiet one: the two see the same machine otherwise.
                    // A neighbour that cannot start loses the loaded figure only.
                    do {
                        let neighbour = try BackgroundLoad(threads: backgroundLoad, seconds: duration + 60)
                        defer { neighbour.stop() }
                        let loaded = try measure(transferEngine, op: op, block: block, batch: batch, local: local, handle: handle, remote: remote.address, wrap: wrap)
                        result.loaded = .init(gbps: loaded.gbps, p50Micros: loaded.p50Micros, p99Micros: loaded.p99Micros, iterations: loaded.iterations)
                    } catch let error as EngineError where error.isBackgroundLoadFailure {
                        FileHandle.standardError.write(Data("\(label): no loaded figure: \(error)\n".utf8))
                    }
                }
                if verify, block * UInt64(batch) <= limit {
                    result.verified = try verifyBytes(transferEngine, block: block, batch: batch, local: local, handle: handle, remote: remote.address)
                    if result.verified == false { failures.append(label) }
                }
                results.append(result)
                var line = result.dictionary(reference: streamReference)
                line["case"] = index + 1
                // The ceiling so far: later cases of this block size may still raise it (the table
                // and the --json document carry the final one).
                if let ceiling = ceilings.ceiling(op, block) { line["memcpy_gbps_so_far"] = ceiling }
                try lines?.append(line)
            } catch {
                try? lines?.append(["case": index + 1, "label": label, "error": "\(error)"])
                throw error
            }
        }

        print("segment \(segmentName) (protocol \(transferEngine.activeProtocol)); first operation to the new peer: \(String(format: "%.0f", firstOpMicros)) us (open segment \(String(format: "%.0f", openMicros)) us)")
        if let streamReference {
            print("reference: one plain loopback TCP stream = \(String(format: "%.2f", streamReference / 1e9)) GB/s (measured in this run)")
        }
        var rows: [[String]] = []
        for r in results {
            var row = [r.operation, ByteSize.format(r.blockSize), String(r.batchSize), String(format: "%.3f", r.gbps),
                       String(format: "%.1f", r.p50Micros), String(format: "%.1f", r.p99Micros), String(r.iterations)]
            row.append(streamReference.map { String(format: "%.2fx", r.gbps * 1e9 / $0) } ?? "-")
            if memcpyReference {
                // Above the ceiling means the ceiling or the measurement is wrong, not a fast transport.
                row.append(ceilings.ceiling(r.operation == "read" ? .read : .write, r.blockSize).map { String(format: "%.2f (%.2fx", $0, r.gbps / $0) + (r.gbps > $0 ? " ABOVE CEILING)" : ")") } ?? "-")
            }
            if backgroundLoad > 0 {
                row += r.loaded.map { [String(format: "%.3f", $0.gbps), String(format: "%.1f", $0.p50Micros), String(format: "%.2fx", $0.gbps / r.gbps)] }
                    ?? ["-", "-", "-"]
            }
            if verify { row.append(r.verified == true ? "ok" : "MISMATCH") }
            rows.append(row)
        }
        var header = ["op", "block", "batch", "GB/s", "p50 us", "p99 us", "iterations", "vs stream"]
        if memcpyReference { header.append("memcpy x\(memcpyThreads) GB/s (ratio)") }
        if backgroundLoad > 0 { header += ["loaded GB/s", "loaded p50 us", "loaded/quiet"] }
        if verify { header.append("verify") }
        print(Table.render(header: header, rows: rows))

        if let json {
            let document: [String: Any] = [
                "segment": segmentName, "protocol": transferEngine.activeProtocol, "version": TransferEngineVersion.string,
                "first_operation_us": firstOpMicros, "open_segment_us": openMicros, "working_set_bytes": wrap as Any,
                "background_load_threads": backgroundLoad,
                "reference": ["loopback_tcp_stream_gbps": streamReference.map { $0 / 1e9 } as Any],
                "results": results.map { $0.dictionary(reference: streamReference) },
                "memcpy_gbps_by_operation": ceilings.dictionary,
                "memcpy_copies_between": memcpyReference ? ceilings.copiesBetween : NSNull(),
                "memcpy_threads": memcpyThreads,
                "memcpy_1thread_gbps": Dictionary(uniqueKeysWithValues: ceilings.oneThread.map { (String($0.key), $0.value) }),
            ]
            let data = try JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: json))
            FileHandle.standardError.write(Data("wrote \(json)\n".utf8))
        }
        if !failures.isEmpty { throw EngineError.transferFailed("byte verification failed for: \(failures.joined(separator: ", "))") }
    }

    private func measure(_ engine: TransferEngine, op: TransferRequest.Operation, block: UInt64, batch: Int,
                         local: UInt64, handle: SegmentHandle, remote: UInt64, wrap: UInt64?) throws -> BenchResult {
        let benchCase = BenchCase(engine: engine, op: op, block: block, batch: batch, local: local, handle: handle, remote: remote, wrap: wrap)
        try benchCase.once()  // warm-up: connections and lanes exist before timing
        // Options read once: an ArgumentParser property read per iteration showed in profiles.
        let limit = maxIterations
        var latencies: [UInt64] = []
        latencies.reserveCapacity(min(limit, 1 << 16))
        let start = MonotonicClock.nanoseconds()
        let end = start + UInt64(duration * 1e9)
        while latencies.count < limit {
            let t0 = MonotonicClock.nanoseconds()
            try benchCase.once()
            let t1 = MonotonicClock.nanoseconds()
            latencies.append(t1 - t0)
            if t1 >= end { break }
        }
        let elapsed = Double(MonotonicClock.nanoseconds() - start) / 1e9
        latencies.sort()
        func percentile(_ p: Double) -> Double {
            Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1000
        }
        let bytes = Double(block) * Double(batch) * Double(latencies.count)
        return BenchResult(operation: op.description, blockSize: block, batchSize: batch,
                           gbps: bytes / elapsed / 1e9, p50Micros: percentile(0.5), p99Micros: percentile(0.99), iterations: latencies.count)
    }

    private func verifyBytes(_ engine: TransferEngine, block: UInt64, batch: Int, local: UInt64, handle: SegmentHandle, remote: UInt64) throws -> Bool {
        let span = block * UInt64(batch)
        let readBack = local + span
        let seed = block &+ UInt64(batch)
        BenchPattern.fill(address: local, length: span, seed: seed)
        memset(UnsafeMutableRawPointer(bitPattern: UInt(readBack))!, 0, Int(span))
        let writes = (0..<batch).map { i in
            TransferRequest(operation: .write, localAddress: local + UInt64(i) * block, segment: handle, remoteAddress: remote + UInt64(i) * block, length: block)
        }
        let reads = (0..<batch).map { i in
            TransferRequest(operation: .read, localAddress: readBack + UInt64(i) * block, segment: handle, remoteAddress: remote + UInt64(i) * block, length: block)
        }
        try engine.transferBatchSync(writes)
        try engine.transferBatchSync(reads)
        return BenchPattern.firstMismatch(address: readBack, length: span, seed: seed) == nil
    }
}
