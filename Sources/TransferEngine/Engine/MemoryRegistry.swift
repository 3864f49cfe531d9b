/// The table of locally registered memory, the single authority on which
/// bytes a peer (or a local request) may touch.
///
/// Lookups happen on every request, so the ranges are kept sorted and
/// searched by bisection. The data server holds the read lock while it copies,
/// so `unregister` returns only after no transfer touches the range any more.
final class MemoryRegistry: @unchecked Sendable {
    /// One registered range.
    struct Region: Equatable {
        var address: UInt64
        var length: UInt64
        var location: String
        var end: UInt64 { address + length }
        /// Whether the CPU can touch it: device memory is only moved by its plugin.
        var hostAccessible: Bool { MemoryLocation.isHostAccessible(location) }
    }

    private let lock = ReadWriteLock()
    private var regions: [Region] = []

    /// Adds a range; rejects zero length, wrap-around and overlap with an existing range.
    func register(address: UInt64, length: UInt64, location: String) throws {
        guard address != 0 else { throw EngineError.invalidArgument("cannot register address 0") }
        guard length != 0 else { throw EngineError.invalidArgument("cannot register a zero-length buffer") }
        guard !address.addingReportingOverflow(length).overflow else {
            throw EngineError.invalidArgument("buffer at 0x\(String(address, radix: 16)) of \(length) bytes wraps the address space")
        }
        try lock.withWriteLock {
            let index = insertionIndex(address)
            if index > 0, regions[index - 1].end > address {
                throw EngineError.registrationConflict("[0x\(String(address, radix: 16)), +\(length)) overlaps the buffer at 0x\(String(regions[index - 1].address, radix: 16))")
            }
            if index < regions.count, regions[index].address < address + length {
                throw EngineError.registrationConflict("[0x\(String(address, radix: 16)), +\(length)) overlaps the buffer at 0x\(String(regions[index].address, radix: 16))")
            }
            regions.insert(Region(address: address, length: length, location: location), at: index)
        }
    }

    /// Removes the range that starts at `address`; waits for transfers that use it.
    @discardableResult
    func unregister(address: UInt64) throws -> Region {
        try lock.withWriteLock {
            let index = insertionIndex(address)
            guard index < regions.count, regions[index].address == address else {
                throw EngineError.invalidArgument("no buffer is registered at 0x\(String(address, radix: 16))")
            }
            return regions.remove(at: index)
        }
    }

    /// All registered ranges, in address order.
    var all: [Region] { lock.withReadLock { regions } }

    /// The region holding [address, address+length), if one does.
    func region(containing address: UInt64, length: UInt64) -> Region? {
        lock.withReadLock { find(address, length) }
    }

    /// Runs `body` while [address, address+length) is guaranteed to stay registered;
    /// returns nil without running it when the range is not inside one region.
    /// Device memory counts as unregistered here: the TCP server must never dereference it.
    func withRegistered<R>(address: UInt64, length: UInt64, _ body: () throws -> R) rethrows -> R? {
        try lock.withReadLock {
            guard find(address, length)?.hostAccessible == true else { return nil }
            return try body()
        }
    }

    /// Runs `body` under the read lock with a lookup that checks ranges against the
    /// registrations held stable for the duration (several ranges, one lock acquisition);
    /// device memory counts as unregistered, as in `withRegistered`.
    func withStableRegistrations<R>(_ body: (_ isRegistered: (UInt64, UInt64) -> Bool) throws -> R) rethrows -> R {
        try lock.withReadLock { try body { self.find($0, $1)?.hostAccessible == true } }
    }

    private func find(_ address: UInt64, _ length: UInt64) -> Region? {
        guard length > 0 else { return nil }
        let index = insertionIndex(address &+ 1)  // first region starting after `address`
        guard index > 0 else { return nil }
        let region = regions[index - 1]
        guard address >= region.address else { return nil }
        let offset = address - region.address
        guard offset < region.length, length <= region.length - offset else { return nil }
        return region
    }

    /// Index of the first region whose start is >= address.
    private func insertionIndex(_ address: UInt64) -> Int {
        var low = 0, high = regions.count
        while low < high {
            let mid = (low + high) / 2
            if regions[mid].address < address { low = mid + 1 } else { high = mid }
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
