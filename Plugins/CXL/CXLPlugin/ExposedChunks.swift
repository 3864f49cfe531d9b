import TransportPluginKit
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Which of this engine's chunks peers on the pool may reach: a chunk is exposed while at least
/// one registration covers it, and concealed (peers refused, copies in flight waited for) when
/// the last one goes.
final class ExposedChunks: @unchecked Sendable {
    /// How long unregistering waits for peers' copies in flight (as the TCP server does).
    static let graceNs: UInt64 = 2_000_000_000

    private let table: PoolTable
    /// Held across a whole register or unregister, waits included, so a chunk is never exposed
    /// and concealed at once; the data path never takes it.
    private let lock = Signal()
    private var counts: [Int: Int] = [:]
    private var registrations: [UInt64: [Range<Int>]] = [:]

    init(table: PoolTable) { self.table = table }

    /// Exposes `range` for a registration at `address`.
    func register(address: UInt64, range: Range<Int>) {
        lock.locked {
            registrations[address, default: []].append(range)
            for chunk in range {
                counts[chunk, default: 0] += 1
                if counts[chunk] == 1 { table.expose(chunk) }
            }
        }
    }

    /// Drops the registration at `address`; chunks no registration covers any more are concealed.
    /// Returns how many peers' copies were still counted after the grace period (dropped).
    func unregister(address: UInt64) -> UInt32 {
        lock.locked {
            guard var ranges = registrations[address], let range = ranges.popLast() else { return 0 }
            registrations[address] = ranges.isEmpty ? nil : ranges
            return conceal(range)
        }
    }

    /// Drops every registration inside `range` (memory being freed) and conceals it.
    func forget(_ range: Range<Int>) -> UInt32 {
        lock.locked {
            var stuck: UInt32 = 0
            for (address, ranges) in registrations {
                let inside = ranges.filter { $0.overlaps(range) }
                guard !inside.isEmpty else { continue }
                registrations[address] = ranges.count == inside.count ? nil : ranges.filter { !$0.overlaps(range) }
                for covered in inside { stuck &+= conceal(covered) }
            }
            return stuck
        }
    }

    /// Every chunk exposed now (shutdown).
    func forgetAll() {
        lock.locked {
            let deadline = monotonicNanoseconds() &+ Self.graceNs
            for chunk in counts.keys { _ = table.conceal(chunk, deadline: deadline) }
            counts.removeAll()
            registrations.removeAll()
        }
    }

    /// Caller holds the lock.
    private func conceal(_ range: Range<Int>) -> UInt32 {
        let deadline = monotonicNanoseconds() &+ Self.graceNs
        var stuck: UInt32 = 0
        for chunk in range {
            counts[chunk, default: 1] -= 1
            guard counts[chunk] == 0 else { continue }
            counts[chunk] = nil
            stuck &+= table.conceal(chunk, deadline: deadline)
        }
        return stuck
    }
}
