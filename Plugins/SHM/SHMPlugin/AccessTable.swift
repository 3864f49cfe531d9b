import CSHMShim
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// This engine's access words, one per registered buffer, in a memfd that same-host peers map:
/// a peer copies into or out of a buffer only while its word is exposed at the generation the
/// peer's descriptor names, counting itself in for the copy. Unregistering clears the exposure,
/// waits for the copies in flight and moves the word to a new generation, so a peer holding an
/// old descriptor is refused from then on, also after the slot serves another buffer.
final class AccessTable: @unchecked Sendable {
    /// Registrations at once that peers can reach (64 KiB of words, mapped by every peer).
    static let slots = 8192
    /// How long unregistering waits for peers' copies in flight (as the TCP server does).
    static let graceNs: UInt64 = 2_000_000_000

    let fd: Int32
    let inode: UInt64
    let base: UnsafeMutablePointer<UInt64>
    var size: UInt64 { UInt64(Self.slots * 8) }
    /// Held across a whole register or unregister, waits included; the data path never takes it.
    private let lock = Signal()
    private var free: [Int]
    private var byAddress: [UInt64: [Int]] = [:]
    private var warnedFull = false

    init?() {
        var fd: Int32 = -1, inode: UInt64 = 0
        var address: UnsafeMutableRawPointer?
        guard shm_memfd_alloc(UInt64(Self.slots * 8), &fd, &address, &inode) == 0, let address else { return nil }
        self.fd = fd
        self.inode = inode
        base = address.assumingMemoryBound(to: UInt64.self)
        free = Array((0..<Self.slots).reversed())
    }

    /// Exposes a new registration at `address`: its slot and generation, or nil when every slot
    /// is taken (peers then cannot reach the buffer through shm).
    func expose(address: UInt64) -> (slot: Int, generation: UInt32)? {
        lock.locked {
            guard let slot = free.popLast() else { return nil }
            let generation = UInt32(truncatingIfNeeded: shm_slot_load(base + slot) >> 32)
            shm_slot_store(base + slot, UInt64(generation) << 32 | 0x8000_0000)
            byAddress[address, default: []].append(slot)
            return (slot, generation)
        }
    }

    /// Unmaps and closes the table (the instance is destroyed; peers' mappings stay valid, unexposed).
    func close() {
        lock.locked {
            for slot in byAddress.values.joined() { _ = shm_slot_conceal(base + slot) }
            byAddress.removeAll()
        }
        _ = shm_unmap(UnsafeMutableRawPointer(base), size)
        _ = shm_close(fd)
    }

    /// True the first time it is asked after the table ran full (one warning per engine).
    func firstTimeFull() -> Bool { lock.locked { defer { warnedFull = true }; return !warnedFull } }

    /// Conceals the latest registration at `address`; returns how many peers' copies were still
    /// counted after the grace period (dropped), or nil when none is known.
    func conceal(address: UInt64) -> UInt32? {
        lock.locked {
            guard var slots = byAddress[address], let slot = slots.popLast() else { return nil }
            byAddress[address] = slots.isEmpty ? nil : slots
            let word = base + slot
            var inFlight = shm_slot_conceal(word)
            let deadline = monotonicNanoseconds() + Self.graceNs
            while inFlight > 0 {
                if monotonicNanoseconds() >= deadline { break }
                usleep(200)
                inFlight = UInt32(truncatingIfNeeded: shm_slot_load(word)) & 0x7FFF_FFFF
            }
            // A new generation: descriptors naming the old one are refused, stragglers' counts ignored.
            let generation = UInt32(truncatingIfNeeded: shm_slot_load(word) >> 32) &+ 1
            shm_slot_store(word, UInt64(generation) << 32)
            free.append(slot)
            return inFlight
        }
    }
}
