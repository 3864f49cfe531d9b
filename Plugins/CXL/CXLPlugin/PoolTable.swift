import CCXLShim
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The pool's allocation table (layout 2), kept at the start of the pool so every engine mapping
/// it agrees. The pool is cut into chunks (2 MiB, or the device-dax alignment if larger); the
/// header holds one owner word and one access word per chunk.
///
/// Who is alive is decided by open-file-description locks on the pool's file or device, which the
/// kernel drops with their holder and which mean the same in every pid namespace of a host: each
/// engine holds the lock of one engine slot (byte 1 + slot) for as long as it maps the pool, and
/// the table is set up under the lock of byte 0. An owner word names host, slot and the slot's
/// epoch, so a chunk left by a dead engine is recognised even after its slot was taken again.
///
/// Access words make unregistering final for peers on the pool: a peer copies into or out of a
/// chunk only while the owner exposes it, counting itself in for the copy; the owner clears the
/// exposure and waits for the copies in flight before the memory is reused.
struct PoolTable {
    static let magic: UInt64 = 0x3250_4C58_4345_5445  // "TECXLP2" little-endian
    static let layout: UInt64 = 2
    /// The first layout's words: a pool they were left in is set up again when nobody uses it.
    static let legacyMagic: UInt64 = 0x3150_4C58_4345_5445
    static let legacyInitialising: UInt64 = 0x2D2D_2D2D_2D2D_2D2D
    static let engineSlots = 1024
    static let epochMask: UInt64 = 0xFF_FFFF
    /// How long an engine waits for another one setting the table up.
    static let setupWaitMs: Int32 = 10_000
    /// An owner word while a dead owner's chunk is being taken back (never a real owner: bit 63 clear).
    static let reclaiming: UInt64 = 1
    /// How long taking back a dead owner's chunks waits for peers' copies into them.
    static let reclaimGraceNs: UInt64 = 2_000_000_000

    let base: UnsafeMutableRawPointer
    let fd: Int32
    let chunkSize: UInt64
    var chunkShift: UInt64 { UInt64(chunkSize.trailingZeroBitCount) }
    let chunks: Int
    let firstDataChunk: Int
    /// 23 bits of the boot id (never 0): liveness can only be judged for engines of this host (this boot).
    let hostHash: UInt64
    /// A file pool exists on one host only: owners of another boot are dead (a reboot's leftovers).
    let singleHost: Bool
    let slot: Int
    /// This engine's owner word: bit 63, host (23 bits), slot (16 bits), epoch (24 bits).
    let owner: UInt64

    private var header: UnsafeMutablePointer<UInt64> { base.assumingMemoryBound(to: UInt64.self) }
    private var epochs: UnsafeMutablePointer<UInt64> { header + 8 }
    private func ownerWord(_ chunk: Int) -> UnsafeMutablePointer<UInt64> { header + 8 + Self.engineSlots + 2 * chunk }
    private func accessWord(_ chunk: Int) -> UnsafeMutablePointer<UInt64> { ownerWord(chunk) + 1 }

    /// The table's geometry for a pool of `size` bytes.
    static func geometry(size: UInt64, align: UInt64) -> (chunkSize: UInt64, chunks: Int, firstDataChunk: Int, headerBytes: Int) {
        let chunkSize = max(2 << 20, align)
        let chunks = Int(size / chunkSize)
        let headerBytes = 8 * (8 + engineSlots + 2 * chunks)
        return (chunkSize, chunks, Int((UInt64(headerBytes) + chunkSize - 1) / chunkSize), headerBytes)
    }

    /// Maps the table of a pool: checks it, sets it up when nobody uses the pool and it is fresh
    /// (or left by an earlier layout), and takes an engine slot. On failure, why.
    static func open(base: UnsafeMutableRawPointer, fd: Int32, size: UInt64, align: UInt64, bootID: String,
                     path: String, isDevice: Bool) -> Result<PoolTable, PoolTableError> {
        let (chunkSize, chunks, firstDataChunk, headerBytes) = geometry(size: size, align: align)
        guard chunkSize.nonzeroBitCount == 1 else { return .failure(.init("\(path): alignment \(align) is not a power of two")) }
        guard chunks > firstDataChunk else { return .failure(.init("\(path): \(size) bytes leave no chunk of \(chunkSize) bytes beside the table")) }
        let locked = cxl_lock(fd, 0, setupWaitMs)
        guard locked == 0 else {
            return .failure(.init("\(path): cannot take the pool's setup lock (\(locked == -EAGAIN ? "another engine held it for 10 s" : String(cString: strerror(-locked))))"))
        }
        defer { cxl_unlock(fd, 0) }
        let header = base.assumingMemoryBound(to: UInt64.self)
        let first = cxl_load(header)
        let current = first == magic && header[1] == layout && header[2] == chunkSize && header[3] == UInt64(chunks)
            && header[4] == UInt64(engineSlots)
        if !current {
            let live = cxl_lock_held(fd, 1, UInt64(engineSlots))
            let word = "0x" + String(first, radix: 16)
            guard live == 0 else {
                return .failure(.init(live > 0
                    ? "\(path): the pool's table does not match this engine (word 0 = \(word), \(chunks) chunks of \(chunkSize) bytes expected) while other engines use the pool; not clearing it (same MC_CXL_DEV_SIZE on every engine?)"
                    : "\(path): cannot query the pool's locks: \(String(cString: strerror(-live)))"))
            }
            if first == legacyMagic || first == legacyInitialising, let pid = legacyOwnerAlive(base: base, size: size, bootID: bootID) {
                return .failure(.init("\(path) is used by an engine of the earlier pool layout (pid \(pid)); engines of both layouts cannot share a pool"))
            }
            let known = first == 0 || first == magic || first == legacyMagic || first == legacyInitialising
            guard known || isDevice else {
                return .failure(.init("\(path) does not start with a pool table (word 0 = \(word)); a file may hold other data, so it is not overwritten: recreate it (truncate -s SIZE) or name another pool"))
            }
            cxl_store(header, 0)
            memset(base + 8, 0, headerBytes - 8)
            header[1] = layout
            header[2] = chunkSize
            header[3] = UInt64(chunks)
            header[4] = UInt64(engineSlots)
            cxl_store(header, magic)  // last: a setup cut short leaves no magic and is redone
        }
        guard let slot = (0..<engineSlots).first(where: { cxl_lock(fd, 1 + UInt64($0), 0) == 0 }) else {
            return .failure(.init("\(path): all \(engineSlots) engine slots of the pool are in use"))
        }
        let epoch = (cxl_load(header + 8 + slot) &+ 1) & epochMask
        cxl_store(header + 8 + slot, epoch)
        var hash: UInt64 = 1469598103934665603
        for byte in bootID.utf8 { hash = (hash ^ UInt64(byte)) &* 1099511628211 }
        let hostHash = hash & 0x7F_FFFF | 1
        return .success(PoolTable(base: base, fd: fd, chunkSize: chunkSize, chunks: chunks, firstDataChunk: firstDataChunk,
                                  hostHash: hostHash, singleHost: !isDevice, slot: slot,
                                  owner: 1 << 63 | hostHash << 40 | UInt64(slot) << 24 | epoch))
    }

    /// A running process of this boot that owns a chunk in a table of the first layout (which
    /// took no locks: owners were boot-hash << 32 | pid), if any.
    private static func legacyOwnerAlive(base: UnsafeMutableRawPointer, size: UInt64, bootID: String) -> pid_t? {
        let header = base.assumingMemoryBound(to: UInt64.self)
        let chunks = min(header[1], (size - 64) / 8)
        var hash: UInt64 = 1469598103934665603
        for byte in bootID.utf8 { hash = (hash ^ UInt64(byte)) &* 1099511628211 }
        let bootHash = hash & 0x7FFF_FFFF
        let owners = (base + 64).assumingMemoryBound(to: UInt64.self)
        for index in 0..<Int(chunks) {
            let holder = cxl_load(owners + index)
            guard holder != 0, holder >> 32 == bootHash else { continue }
            let pid = pid_t(bitPattern: UInt32(truncatingIfNeeded: holder))
            if pid > 0, kill(pid, 0) == 0 || errno == EPERM { return pid }
        }
        return nil
    }

    /// The chunks [offset, offset + length) touches, if it lies in the pool's data chunks.
    func chunkRange(offset: UInt64, length: UInt64) -> Range<Int>? {
        let limit = UInt64(chunks) * chunkSize
        guard length > 0, offset >= UInt64(firstDataChunk) * chunkSize, offset < limit, length <= limit - offset else { return nil }
        // Shifts: this runs on every copy, and the chunk size is a power of two.
        return Int(offset >> chunkShift)..<Int((offset + length - 1) >> chunkShift + 1)
    }

    /// Whether this engine owns every chunk of `range`.
    func owns(_ range: Range<Int>) -> Bool { range.allSatisfy { cxl_load(ownerWord($0)) == owner } }

    /// Lets peers copy into and out of `chunk`.
    func expose(_ chunk: Int) { _ = cxl_expose(accessWord(chunk), 1) }

    /// Stops new copies into `chunk` and waits for those in flight until `deadline` (CLOCK_MONOTONIC
    /// nanoseconds); copies still counted then (a peer that died mid-copy) are dropped from the
    /// count. Returns how many were dropped.
    func conceal(_ chunk: Int, deadline: UInt64) -> UInt32 {
        var inFlight = cxl_expose(accessWord(chunk), 0)
        while inFlight > 0 && monotonicNanoseconds() < deadline {
            usleep(200)
            inFlight = UInt32(truncatingIfNeeded: cxl_load(accessWord(chunk)))
        }
        if inFlight > 0 { cxl_store(accessWord(chunk), 0) }
        return inFlight
    }

    /// Counts a copy into every chunk of `range` if `holder` owns and exposes them all; false (and
    /// nothing counted) otherwise.
    func pin(_ range: Range<Int>, holder: UInt64) -> Bool {
        for chunk in range {
            guard cxl_pin(accessWord(chunk)) == 1 else { unpin(range.lowerBound..<chunk); return false }
            guard cxl_load(ownerWord(chunk)) == holder else { unpin(range.lowerBound..<(chunk + 1)); return false }
        }
        return true
    }

    /// Counts the copy pinned by `pin` out again.
    func unpin(_ range: Range<Int>) { for chunk in range { cxl_unpin(accessWord(chunk)) } }

    /// Claims a run of chunks for `length` bytes; returns the pool offset.
    func allocate(_ length: UInt64) -> UInt64? {
        guard length > 0, length <= UInt64(chunks) * chunkSize else { return nil }
        let needed = Int((length - 1) / chunkSize + 1)
        for attempt in 0..<2 {
            var start = firstDataChunk
            while start + needed <= chunks {
                var claimed = 0
                while claimed < needed && cxl_claim(ownerWord(start + claimed), owner) == 1 { claimed += 1 }
                if claimed == needed { return UInt64(start) * chunkSize }
                for i in 0..<claimed { _ = cxl_release(ownerWord(start + i), owner) }
                start += claimed + 1
            }
            if attempt == 0 && reclaimDead() == 0 { break }
        }
        return nil
    }

    /// Returns the chunks of an allocation (already concealed) to the pool.
    func release(_ offset: UInt64, _ length: UInt64) {
        guard let range = chunkRange(offset: offset, length: length) else { return }
        for chunk in range {
            cxl_store(accessWord(chunk), 0)
            _ = cxl_release(ownerWord(chunk), owner)
        }
    }

    /// Whether the engine behind an owner word still runs (engines of other hosts: assumed so on a
    /// device, which several hosts may map; on a file pool an owner of another boot is gone).
    func isLive(_ holder: UInt64) -> Bool {
        guard holder >> 40 & 0x7F_FFFF == hostHash else { return !singleHost }
        let other = Int(holder >> 24 & 0xFFFF)
        guard other < Self.engineSlots else { return false }
        if other == slot { return holder == owner }
        guard cxl_load(epochs + other) & Self.epochMask == holder & Self.epochMask else { return false }
        return cxl_lock_held(fd, 1 + UInt64(other), 1) != 0  // an error counts as alive
    }

    /// Frees chunks held by engines of this host that no longer run. A chunk is first marked as
    /// being taken back (so one engine does it), then concealed (a dead owner never did, and peers
    /// holding its descriptor may be inside), and only then returned to the pool.
    func reclaimDead() -> Int {
        var freed = 0
        let deadline = monotonicNanoseconds() &+ Self.reclaimGraceNs
        for chunk in firstDataChunk..<chunks {
            let holder = cxl_load(ownerWord(chunk))
            guard holder != 0, holder != Self.reclaiming, !isLive(holder),
                  cxl_cas(ownerWord(chunk), holder, Self.reclaiming) == 1 else { continue }
            _ = conceal(chunk, deadline: deadline)
            cxl_store(accessWord(chunk), 0)
            cxl_store(ownerWord(chunk), 0)
            freed += 1
        }
        return freed
    }
}

/// Why a pool's table cannot be used.
struct PoolTableError: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}
