import ArgumentParser
import Foundation
import TransferEngine

/// `serve`: register a buffer, print the segment name and address, wait.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Register a buffer, print the segment name and buffer address, and serve peers until stopped.",
        discussion: """
        Prints one line: READY segment=<name> buffer=0x<address> length=<bytes> protocol=<first> protocols=<every transport, tcp last>
        and serves until SIGINT/SIGTERM (or until standard input closes, with --exit-on-stdin-close).
        The buffer is filled with a position-dependent pattern so readers can verify bytes.
        """
    )

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var engine: EngineOptions

    @OptionGroup var metrics: MetricsOptions

    @Option(help: "Size of the registered buffer (e.g. 512MiB, 1GB, 1073741824).")
    var bufferSize: String = "512MiB"

    @Option(help: "Memory location of the buffer: cpu:0, or a GPU (cuda:0, hip:0) served by a GPU plugin, or cuda:0 with rdma (GPUDirect RDMA).")
    var location: String = "cpu:0"

    @Flag(help: "Exit when standard input reaches end of file (used by bench --loopback).")
    var exitOnStdinClose = false

    @Flag(help: "Take commands on standard input, one a line, each answered with one line (used by plugins --check): zero-unregister (zero the buffer, unregister it), nonzero (how many of its bytes are not zero), register, drop-pages (give the whole pages of the buffer back: they read as zeros and are allocated again where used; not for memory a plugin has pinned).")
    var commands = false

    func run() throws {
        try runReportingErrors {
            let logger = logging.logger()
            let configuration = try engine.resolve(logger: logger)
            let size = try ByteSize.parse(bufferSize)
            let endpoint = try metrics.start(host: configuration.metricsHost)
            defer { endpoint?.stop() }
            let transferEngine = try TransferEngine(configuration: configuration, logger: logger)
            let address = try transferEngine.allocateManagedBuffer(length: size, location: location)
            if MemoryLocation.isHostAccessible(location) { BenchPattern.fill(address: address, length: size, seed: 0) }
            print("READY segment=\(transferEngine.segmentName) buffer=0x\(String(address, radix: 16)) length=\(size) protocol=\(transferEngine.activeProtocol) protocols=\(transferEngine.activeProtocols.joined(separator: ","))")
            fflush(nil)

            let stop = SignalSources.stopOnTermination()
            if commands {
                Thread.detachNewThread {
                    while let line = readLine() {
                        print(ServeCommands.answer(line, engine: transferEngine, address: address, length: size, location: location))
                        fflush(nil)
                    }
                    if exitOnStdinClose { stop.signal() }
                }
            } else if exitOnStdinClose {
                Thread.detachNewThread {
                    while FileHandle.standardInput.availableData.count > 0 {}
                    stop.signal()
                }
            }
            stop.wait()
            transferEngine.shutdown()
            try? transferEngine.freeManagedBuffer(address: address)
        }
    }
}

/// What `serve --commands` does with a line of standard input.
enum ServeCommands {
    static func answer(_ line: String, engine: TransferEngine, address: UInt64, length: UInt64, location: String) -> String {
        switch line.trimmingCharacters(in: .whitespaces) {
        case "zero-unregister":
            guard MemoryLocation.isHostAccessible(location) else { return "ERROR the buffer is not host memory" }
            memset(UnsafeMutableRawPointer(bitPattern: UInt(address))!, 0, Int(length))
            do { try engine.unregisterMemory(address: address) } catch { return "ERROR \(error)" }
            return "UNREGISTERED"
        case "nonzero":
            guard MemoryLocation.isHostAccessible(location) else { return "ERROR the buffer is not host memory" }
            let bytes = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(address)), count: Int(length))
            return "NONZERO \(bytes.reduce(0) { $0 + ($1 == 0 ? 0 : 1) })"
        case "register":
            do { try engine.registerMemory(address: address, length: length, location: location) } catch { return "ERROR \(error)" }
            return "REGISTERED"
        case "drop-pages":
            guard MemoryLocation.isHostAccessible(location) else { return "ERROR the buffer is not host memory" }
            // Whole pages inside the buffer only: a partial last page may hold other heap data.
            let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
            let (start, end) = ((address + page - 1) / page * page, (address + length) / page * page)
            guard end > start, let pointer = UnsafeMutableRawPointer(bitPattern: UInt(start)) else { return "ERROR the buffer holds no whole page" }
            // A memfd's shared mapping frees its pages with MADV_REMOVE; private anonymous memory
            // (which refuses that with EINVAL) with MADV_DONTNEED.
            if madvise(pointer, Int(end - start), MADV_REMOVE) == 0 { return "DROPPED remove" }
            guard errno == EINVAL else { return "ERROR madvise(MADV_REMOVE): errno \(errno)" }
            guard madvise(pointer, Int(end - start), MADV_DONTNEED) == 0 else { return "ERROR madvise(MADV_DONTNEED): errno \(errno)" }
            return "DROPPED dontneed"
        default:
            return "ERROR unknown command '\(line)' (zero-unregister, nonzero, register, drop-pages)"
        }
    }
}

/// Keeps signal sources alive for the process lifetime.
enum SignalSources {
    nonisolated(unsafe) static var keep: [DispatchSourceSignal] = []

    /// A semaphore signalled on SIGINT or SIGTERM (the default actions are disabled).
    static func stopOnTermination() -> DispatchSemaphore {
        let stop = DispatchSemaphore(value: 0)
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { stop.signal() }
            source.resume()
            keep.append(source)
        }
        return stop
    }
}

/// The byte pattern serve fills and bench --verify checks: byte i = (i * 131 + seed) mod 251.
enum BenchPattern {
    static let period = 251

    static func fill(address: UInt64, length: UInt64, seed: UInt64) {
        let p = UnsafeMutablePointer<UInt8>(bitPattern: UInt(address))!
        let count = Int(length)
        for i in 0..<min(count, period) { p[i] = UInt8((UInt64(i) &* 131 &+ seed) % 251) }
        // The pattern repeats every 251 bytes: replicate by doubling copies.
        var filled = min(count, period)
        while filled < count {
            let chunk = min(filled, count - filled)
            memcpy(p + filled, p, chunk)
            filled += chunk
        }
    }

    /// Whether the bytes differ from the pattern anywhere.
    static func firstMismatch(address: UInt64, length: UInt64, seed: UInt64) -> Int? {
        let p = UnsafePointer<UInt8>(bitPattern: UInt(address))!
        let count = Int(length)
        for i in 0..<min(count, period) where p[i] != UInt8((UInt64(i) &* 131 &+ seed) % 251) { return i }
        // Periodic with period 251 iff every byte equals the one 251 before it.
        if count > period, memcmp(p + period, p, count - period) != 0 { return period }
        return nil
    }
}
