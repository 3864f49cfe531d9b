/// The table of locally registered memory, the single authority on which
/// bytes a peer (or a local request) may touch.
///
/// Lookups happen on every request, so the ranges are kept sorted and searched by bisection.
/// A peer's request pins the region it uses for the duration of its copy (a count taken and
/// dropped under a short lock, never held across network I/O); `unregister` revokes the region
/// at once (no new pins) and returns only after every pin is gone, shutting down the connections
/// of peers still inside it after a grace period, so no transfer touches the range afterwards.
final class MemoryRegistry: @unchecked Sendable {
    /// One registered range.
    struct Region: Equatable {
        let address: UInt64
        let length: UInt64
        let location: String
        /// Whether the CPU can touch it: device memory is only moved by its plugin (kept: every transfer asks).
        let hostAccessible: Bool
        var end: UInt64 { address + length }

        init(address: UInt64, length: UInt64, location: String) {
            self.address = address
            self.length = length
            self.location = location
            hostAccessible = MemoryLocation.isHostAccessible(location)
        }
    }

    /// A region and who is inside it now.
    private struct Entry {
        var region: Region
        var pins = 0
        var revoked = false
        /// Connections of the peers that hold pins (shut down when they outstay the grace period).
        var holders: [ObjectIdentifier: (socket: Socket, count: Int)] = [:]
    }

    private let entries = ConditionLock<[Entry]>([])
    /// How long `unregister` lets peers finish before it shuts their connections down.
    let graceMs: Int

    init(graceMs: Int = 2000) { self.graceMs = graceMs }

    /// Adds a range; rejects zero length, wrap-around and overlap with an existing range.
    func register(address: UInt64, length: UInt64, location: String) throws {
        guard address != 0 else { throw EngineError.invalidArgument("cannot register address 0") }
        guard length != 0 else { throw EngineError.invalidArgument("cannot register a zero-length buffer") }
        guard !address.addingReportingOverflow(length).overflow else {
            throw EngineError.invalidArgument("buffer at 0x\(String(address, radix: 16)) of \(length) bytes wraps the address space")
        }
        try entries.withLock { entries in
            let index = Self.insertionIndex(entries, address)
            if index > 0, entries[index - 1].region.end > address {
                throw EngineError.registrationConflict("[0x\(String(address, radix: 16)), +\(length)) overlaps the buffer at 0x\(String(entries[index - 1].region.address, radix: 16))")
            }
            if index < entries.count, entries[index].region.address < address + length {
                throw EngineError.registrationConflict("[0x\(String(address, radix: 16)), +\(length)) overlaps the buffer at 0x\(String(entries[index].region.address, radix: 16))")
            }
            entries.insert(Entry(region: Region(address: address, length: length, location: location)), at: index)
        }
    }

    /// Removes the range that starts at `address`; returns once no transfer uses it any more
    /// (peers still inside after `graceMs` have their connections shut down first).
    @discardableResult
    func unregister(address: UInt64) throws -> Region {
        try entries.withLock { entries in
            guard let index = Self.index(entries, startingAt: address), !entries[index].revoked else {
                throw EngineError.invalidArgument("no buffer is registered at 0x\(String(address, radix: 16))")
            }
            entries[index].revoked = true
        }
        func drained(_ entries: inout [Entry]) -> Bool? {
            guard let index = Self.index(entries, startingAt: address) else { return true }
            return entries[index].pins == 0 ? true : nil
        }
        let grace = MonotonicClock.nanoseconds() + UInt64(graceMs) * 1_000_000
        if entries.wait(deadline: grace, until: drained) == nil {
            // Outstayed the grace period: end those peers' connections, which ends their copies.
            let holders = entries.withLock { entries in
                Self.index(entries, startingAt: address).map { entries[$0].holders.values.map(\.socket) } ?? []
            }
            holders.forEach { $0.shutdownBoth() }
            _ = entries.wait(until: drained)
        }
        return try entries.withLock { entries in
            guard let index = Self.index(entries, startingAt: address) else {
                throw EngineError.invalidArgument("no buffer is registered at 0x\(String(address, radix: 16))")
            }
            return entries.remove(at: index).region
        }
    }

    /// All registered ranges, in address order (those being unregistered left out).
    var all: [Region] { entries.withLock { $0.filter { !$0.revoked }.map(\.region) } }

    /// As `all`, or nil without copying anything when more than `limit` entries are held.
    func all(atMost limit: Int) -> [Region]? {
        entries.withLock { $0.count > limit ? nil : $0.filter { !$0.revoked }.map(\.region) }
    }

    /// The region holding [address, address+length), if one does.
    func region(containing address: UInt64, length: UInt64) -> Region? {
        entries.withLock { entries in Self.find(entries, address, length).map { entries[$0].region } }
    }

    /// Runs `body` while [address, address+length) is pinned (it stays registered until `body`
    /// returns; `holder`'s connection is shut down if it outstays an unregister's grace period);
    /// returns nil without running it when the range is not inside one region. Device memory
    /// counts as unregistered here: the TCP server must never dereference it.
    func withRegistered<R>(address: UInt64, length: UInt64, holder: Socket? = nil, _ body: () throws -> R) rethrows -> R? {
        guard let pinned = pin(address, length, holder: holder) else { return nil }
        defer { unpin(pinned, holder: holder) }
        return try body()
    }

    /// Runs `body` with a check that pins each range it accepts until `body` returns (several
    /// ranges, as for a group of reads answered in one send); device memory counts as unregistered.
    func withStableRegistrations<R>(holder: Socket? = nil, _ body: (_ isRegistered: (UInt64, UInt64) -> Bool) throws -> R) rethrows -> R {
        var pinned: [UInt64] = []
        defer { pinned.forEach { unpin($0, holder: holder) } }
        return try body { address, length in
            guard let region = self.pin(address, length, holder: holder) else { return false }
            pinned.append(region)
            return true
        }
    }

    /// Pins the host-accessible region holding the range; its start address, or nil.
    private func pin(_ address: UInt64, _ length: UInt64, holder: Socket?) -> UInt64? {
        entries.withLock { entries in
            guard let index = Self.find(entries, address, length), entries[index].region.hostAccessible else { return nil }
            entries[index].pins += 1
            if let holder { entries[index].holders[ObjectIdentifier(holder), default: (holder, 0)].count += 1 }
            return entries[index].region.address
        }
    }

    private func unpin(_ start: UInt64, holder: Socket?) {
        let drained = entries.withLock { entries -> Bool in
            guard let index = Self.index(entries, startingAt: start) else { return false }
            entries[index].pins -= 1
            if let holder, let held = entries[index].holders[ObjectIdentifier(holder)] {
                entries[index].holders[ObjectIdentifier(holder)] = held.count > 1 ? (held.socket, held.count - 1) : nil
            }
            return entries[index].revoked && entries[index].pins == 0
        }
        if drained { entries.notifyAll() }  // an unregister waits for this
    }

    /// The entry holding [address, address+length), not being unregistered.
    private static func find(_ entries: [Entry], _ address: UInt64, _ length: UInt64) -> Int? {
        guard length > 0 else { return nil }
        let index = insertionIndex(entries, address &+ 1)  // first region starting after `address`
        guard index > 0 else { return nil }
        let region = entries[index - 1].region
        guard address >= region.address, !entries[index - 1].revoked else { return nil }
        let offset = address - region.address
        guard offset < region.length, length <= region.length - offset else { return nil }
        return index - 1
    }

    /// The entry that starts at `address` (revoked or not).
    private static func index(_ entries: [Entry], startingAt address: UInt64) -> Int? {
        let index = insertionIndex(entries, address)
        return index < entries.count && entries[index].region.address == address ? index : nil
    }

    /// Index of the first region whose start is >= address.
    private static func insertionIndex(_ entries: [Entry], _ address: UInt64) -> Int {
        var low = 0, high = entries.count
        while low < high {
            let mid = (low + high) / 2
            if entries[mid].region.address < address { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// Mooncake's memory location strings ("cpu:0", "cuda:1", "*").
public enum MemoryLocation {
    /// Prefixes of accelerator memory, which the CPU must not dereference.
    public static let devicePrefixes = ["cuda:", "hip:", "npu:", "musa:", "mlu:"]

    /// Whether memory at `location` is host memory the CPU can read and write.
    public static func isHostAccessible(_ location: String) -> Bool {
        !devicePrefixes.contains { location.hasPrefix($0) }
    }
}
