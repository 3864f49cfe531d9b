import Foundation
import Logging
import TransferEngine

/// The checks with two engines in two processes: this one initiates, a `serve` child owns the
/// target buffer; both load the plugin from the checked file (a directory of its own holds it
/// under the protocol's file name) and may not fall back to TCP for the protocol.
struct EngineBattery {
    static let names = ["sizes 1 B to 16 MiB", "refused locally", "refused after the peer unregistered", "batches from four threads",
                        "each completion reported once", "peer killed mid-batch"]

    let checker: PluginChecker
    let protocolName: String

    func run(skip: String?, progress: (PluginCheckResult) -> Void) -> [PluginCheckResult] {
        func all(_ outcome: PluginCheckResult.Outcome) -> [PluginCheckResult] {
            let results = Self.names.map { PluginCheckResult($0, outcome) }
            results.forEach(progress)
            return results
        }
        if let skip { return all(.skipped(skip)) }
        let session: Session
        do { session = try Session(checker: checker, protocolName: protocolName) } catch {
            return all(.failed("could not start the two engines: \(error)"))
        }
        defer { session.close() }
        let steps: [(String, (Session) throws -> String)] = [
            (Self.names[0], sizes), (Self.names[1], refusedLocally), (Self.names[2], refusedAfterUnregister),
            (Self.names[3], fourThreads), (Self.names[4], completionsOnce), (Self.names[5], killedPeer),
        ]
        var results: [PluginCheckResult] = []
        for (name, step) in steps {
            var result: PluginCheckResult
            _ = session.watch.take()
            do { result = PluginCheckResult(name, .passed, detail: try step(session)) } catch let failure as CheckFailure {
                result = PluginCheckResult(name, failure.skipped ? .skipped(failure.text) : .failed(failure.text))
            } catch {
                result = PluginCheckResult(name, .failed("\(error)"))
            }
            // Requests must have gone through the plugin (a killed peer may make the engine give up on it).
            let fallbacks = session.watch.take()
            if name != Self.names[5], case .passed = result.outcome, let first = fallbacks.first {
                result = PluginCheckResult(name, .failed("the engine stopped using \(protocolName) for the peer: \(first)"))
            }
            results.append(result)
            progress(result)
        }
        return results
    }

    private func sizes(_ s: Session) throws -> String {
        let before = deviceTotals(s)
        var done: [String] = []
        var moved: UInt64 = 0
        for (index, size) in [1, 7, 4095, 4096, 65537, (1 << 20) + 3, 16 << 20].enumerated() where UInt64(size) + 2 * 4097 <= s.remoteLength {
            s.source.fill(seed: UInt8(index + 1), length: size + 2 * 4097)
            s.sink.clear(size)
            let offset = UInt64(index % 3) * 4097
            try s.engine.transferSync(.write, localAddress: s.source.address, segment: s.handle, remoteAddress: s.remote + offset, length: UInt64(size))
            try s.engine.transferSync(.read, localAddress: s.sink.address, segment: s.handle, remoteAddress: s.remote + offset, length: UInt64(size))
            guard s.sink.equals(s.source, size) else { throw CheckFailure("\(size) bytes at +\(offset) read back differently") }
            done.append(ByteText.format(size))
            moved += UInt64(size)
        }
        guard done.count == 7 else { throw CheckFailure("the target range (\(s.remoteLength) bytes) is smaller than 16 MiB", skipped: true) }
        return "written and read back through the plugin, bytes verified: \(done.joined(separator: ", "))"
            + (try statsAgree(s, before: before, read: moved, written: moved))
    }

    /// The plugin's device figures summed (ABI 1.2 `stats`), or nil when it reports no device.
    private func deviceTotals(_ s: Session) -> (read: UInt64, written: UInt64, inflight: UInt64, errors: UInt64)? {
        let devices = s.engine.deviceStatistics().filter { $0.transport == protocolName }
        guard !devices.isEmpty else { return nil }
        return devices.reduce(into: (0, 0, 0, 0)) {
            $0.read &+= $1.bytesRead
            $0.written &+= $1.bytesWritten
            $0.inflight &+= $1.inflightBytes
            $0.errors &+= $1.errors
        }
    }

    /// Where the plugin reports devices: they moved exactly what the requests asked and nothing
    /// is left in flight (read again for up to a second: a plugin may count just after it reports
    /// a completion). Errors (a retried slice) are reported, not failed.
    private func statsAgree(_ s: Session, before: (read: UInt64, written: UInt64, inflight: UInt64, errors: UInt64)?, read: UInt64,
                            written: UInt64) throws -> String {
        let start = before ?? (0, 0, 0, 0)
        let giveUp = Date().addingTimeInterval(1)
        while true {
            guard let after = deviceTotals(s) else { return "" }
            let (gotRead, gotWritten) = (after.read &- start.read, after.written &- start.written)
            if gotRead == read, gotWritten == written, after.inflight == 0 {
                let errors = after.errors &- start.errors
                return "; device stats agree (+\(read) read, +\(written) written, none in flight\(errors > 0 ? ", \(errors) errors retried" : ""))"
            }
            if Date() > giveUp {
                throw CheckFailure("the plugin's stats disagree with the transfers: read +\(gotRead) (expected \(read)), written +\(gotWritten) "
                                   + "(expected \(written)), \(after.inflight) bytes still in flight")
            }
            usleep(10_000)
        }
    }

    private func refusedLocally(_ s: Session) throws -> String {
        let attempts: [(String, () throws -> Void)] = [
            ("past the end of the peer's buffer", { try s.engine.transferSync(.write, localAddress: s.source.address, segment: s.handle,
                                                                             remoteAddress: s.remote + s.remoteLength - 100, length: 4096) }),
            ("before its start", { try s.engine.transferSync(.read, localAddress: s.sink.address, segment: s.handle, remoteAddress: s.remote &- 4096, length: 8192) }),
            ("from unregistered local memory", {
                let stray = TestMemory(1 << 20)
                defer { stray.release() }
                try s.engine.transferSync(.write, localAddress: stray.address, segment: s.handle, remoteAddress: s.remote, length: 4096)
            }),
        ]
        for (what, attempt) in attempts {
            var succeeded = false
            do {
                try attempt()
                succeeded = true
            } catch {}
            if succeeded { throw CheckFailure("a transfer \(what) succeeded") }
        }
        return "out-of-range (both ends) and unregistered requests refused by the engine before the plugin saw them"
    }

    private func refusedAfterUnregister(_ s: Session) throws -> String {
        // The peer zeroes its buffer and unregisters it; this engine still holds its old descriptor.
        guard s.targetIsServeBuffer else {
            throw CheckFailure("the peer's range served by the plugin is not registered memory (e.g. a namespace): nothing to unregister", skipped: true)
        }
        guard s.peer.command("zero-unregister") == "UNREGISTERED" else { throw CheckFailure("the serve process did not unregister its buffer") }
        s.source.fill(seed: 99, length: 1 << 20)
        var refused = 0
        for offset in [UInt64(0), 1 << 20, 8 << 20] {
            do { try s.engine.transferSync(.write, localAddress: s.source.address, segment: s.handle, remoteAddress: s.remote + offset, length: 65536) } catch { refused += 1 }
        }
        let answer = s.peer.command("nonzero")
        guard answer == "NONZERO 0" else {
            throw CheckFailure("bytes reached the peer's buffer after it was unregistered (\(answer ?? "no answer"); \(refused) of 3 writes reported failure)")
        }
        guard refused == 3 else { throw CheckFailure("\(3 - refused) of 3 writes into the unregistered buffer reported success although nothing landed") }
        guard s.peer.command("register") == "REGISTERED" else { throw CheckFailure("the serve process did not register its buffer again") }
        try s.reopen()
        _ = s.watch.take()  // the refused writes may make the engine look elsewhere; the buffer is registered again
        return "3 of 3 writes with the stale descriptor reported failure; none reached the unregistered buffer"
    }

    private func fourThreads(_ s: Session) throws -> String {
        guard s.remoteLength >= 16 << 20 + 4096 else { throw CheckFailure("the target range (\(s.remoteLength) bytes) is smaller than 16 MiB", skipped: true) }
        s.source.fill(seed: 5, length: 16 << 20 + 4096)
        let failures = LockedStrings()
        DispatchQueue.concurrentPerform(iterations: 4) { thread in
            let region = UInt64(thread) * (4 << 20)
            do {
                for round in 0..<8 {
                    let requests = (0..<16).map { i -> TransferRequest in
                        let at = region + UInt64(i) * 65536 + UInt64(round % 3) * 17
                        return TransferRequest(operation: .write, localAddress: s.source.address + at, segment: s.handle, remoteAddress: s.remote + at, length: 65536)
                    }
                    try s.runBatch(requests)
                    let reads = requests.map { TransferRequest(operation: .read, localAddress: s.sink.address + ($0.localAddress - s.source.address),
                                                               segment: s.handle, remoteAddress: $0.remoteAddress, length: $0.length) }
                    try s.runBatch(reads)
                    for request in requests {
                        let at = Int(request.localAddress - s.source.address)
                        if memcmp(s.sink.pointer + at, s.source.pointer + at, Int(request.length)) != 0 { throw CheckFailure("bytes differ at +\(at)") }
                    }
                }
            } catch { failures.add("thread \(thread): \(error)") }
        }
        guard failures.all.isEmpty else { throw CheckFailure(failures.all.prefix(2).joined(separator: "; ")) }
        return "4 threads x 8 rounds of 16 x 64 KiB written and read back in batches, bytes verified"
    }

    private func completionsOnce(_ s: Session) throws -> String {
        let stray = s.engine.pluginStrayCompletions
        guard stray == 0 else { throw CheckFailure("poll reported \(stray) completions for requests not in flight (twice, or never submitted)") }
        return "every request of the checks above completed once (no completion for a request not in flight)"
    }

    private func killedPeer(_ s: Session) throws -> String {
        let count = Int(min(64, s.remoteLength >> 20))
        guard count > 0 else { throw CheckFailure("the target range is smaller than 1 MiB", skipped: true) }
        let requests = (0..<count).map { i in
            TransferRequest(operation: .write, localAddress: s.source.address + UInt64(i) << 20, segment: s.handle, remoteAddress: s.remote + UInt64(i) << 20, length: 1 << 20)
        }
        // A second batch goes out right after the kill, so some requests meet the dying or dead peer
        // even where the first batch finishes before the kill takes effect.
        let batch = try s.engine.allocateBatch(capacity: requests.count)
        let after = try s.engine.allocateBatch(capacity: requests.count)
        defer { try? s.engine.freeBatch(batch); try? s.engine.freeBatch(after) }
        try s.engine.submit(requests, to: batch)
        s.peer.kill()
        let began = Date()
        // Refused at submission (no path to the dead peer left) is a way to end as well: failed.
        var refused = 0
        do { try s.engine.submit(requests, to: after) } catch { refused = requests.count }
        let deadline = MonotonicClock.nanoseconds() + 60_000_000_000
        var statuses: [TransferStatus] = []
        for id in refused > 0 ? [batch] : [batch, after] {
            let now = MonotonicClock.nanoseconds()
            guard try s.engine.wait(batch: id, timeoutNs: deadline > now ? deadline - now : 0) else {
                throw CheckFailure("the batches had not ended 60 s after the peer was killed")
            }
            statuses += try s.engine.statuses(batch: id)
        }
        statuses += Array(repeating: TransferStatus(state: .failed, error: "refused at submission"), count: refused)
        let failed = statuses.filter { $0.state == .failed }.count
        let completed = statuses.filter { $0.state == .completed }.count
        guard failed + completed == statuses.count else {
            let others = statuses.filter { $0.state != .failed && $0.state != .completed }
            let first = others.first.map { " (first: \($0.state), \($0.error ?? "no error text"))" } ?? ""
            throw CheckFailure("\(others.count) requests neither completed nor failed\(first), "
                               + String(format: "%.1f s after the kill", Date().timeIntervalSince(began)))
        }
        return "2 batches of \(count) x 1 MiB: \(completed) completed, \(failed) failed, all ended \(String(format: "%.1f", Date().timeIntervalSince(began))) s after the kill"
    }
}

/// A check's failure (or a reason to skip it), in words.
struct CheckFailure: Error, CustomStringConvertible {
    var text: String
    var skipped = false
    init(_ text: String, skipped: Bool = false) {
        self.text = text
        self.skipped = skipped
    }
    var description: String { text }
}

/// Strings gathered from several threads.
final class LockedStrings: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func add(_ text: String) { lock.withLock { items.append(text) } }
    var all: [String] { lock.withLock { items } }
}

/// Sizes as people write them.
enum ByteText {
    static func format(_ size: Int) -> String {
        if size >= 1 << 20 && size % (1 << 20) == 0 { return "\(size >> 20) MiB" }
        if size >= 1 << 10 && size % (1 << 10) == 0 { return "\(size >> 10) KiB" }
        return "\(size) B"
    }
}
