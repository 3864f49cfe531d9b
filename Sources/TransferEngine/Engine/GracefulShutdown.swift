import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Upstream's enableGracefulShutdown: on SIGINT or SIGTERM, and at exit, every engine that
/// asked for it shuts down cleanly (its metadata keys deleted, listeners and transports
/// closed), then a signalled process ends with 128 + the signal number, as the default action
/// would have reported it.
enum GracefulShutdown {
    private final class Entry: @unchecked Sendable {
        weak var engine: TransferEngine?
        init(_ engine: TransferEngine) { self.engine = engine }
    }

    private struct Registry {
        var entries: [ObjectIdentifier: Entry] = [:]
        var installed = false
        var cleaning = false
    }

    private static let registry = Mutex(Registry())
    private static let queue = DispatchQueue(label: "transfer-engine.graceful-shutdown")
    /// The signal sources, kept for the life of the process (filled once, by the first `register`).
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

    /// Adds `engine`; installs the handlers the first time.
    static func register(_ engine: TransferEngine) {
        let install = registry.withLock { registry -> Bool in
            registry.entries[ObjectIdentifier(engine)] = Entry(engine)
            defer { registry.installed = true }
            return !registry.installed
        }
        guard install else { return }
        for signalNumber in [SIGINT, SIGTERM] {
            // The dispatch source sees the signal; the default action (ending the process at
            // once) must not run first.
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: queue)
            source.setEventHandler {
                // A second signal while the first one's shutdown runs ends the process at once.
                guard registry.withLock({ !$0.cleaning }) else { _exit(128 + signalNumber) }
                do {
                    try OSThread.spawn(name: "te-graceful") {
                        shutDownAll()
                        _exit(128 + signalNumber)
                    }
                } catch {
                    shutDownAll()
                    _exit(128 + signalNumber)
                }
            }
            source.resume()
            sources.append(source)
        }
        atexit { GracefulShutdown.shutDownAll() }
    }

    /// Shuts down every registered engine still alive, once.
    static func shutDownAll() {
        let engines = registry.withLock { registry -> [TransferEngine] in
            if registry.cleaning { return [] }
            registry.cleaning = true
            defer { registry.entries.removeAll() }
            return registry.entries.values.compactMap(\.engine)
        }
        for engine in engines { engine.shutdown() }
    }
}

extension TransferEngine {
    /// On SIGINT or SIGTERM, and at exit, shut this engine down cleanly first: its segment and
    /// rpc_meta keys leave the metadata server at once instead of at their TTL (upstream's
    /// `enableGracefulShutdown`). The signal then ends the process with status 128 + signal.
    public func enableGracefulShutdown() {
        GracefulShutdown.register(self)
        logger.info("graceful shutdown enabled: SIGINT/SIGTERM and exit shut down segment \(segmentName) first")
    }
}
