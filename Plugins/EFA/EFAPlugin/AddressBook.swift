/// The peer addresses in one device's address vector (keyed by their bytes in lower-case hex), in
/// insertion order, at most `capacity`.
struct AddressBook {
    let capacity: Int
    /// An address used (looked up or inserted) this recently is never evicted: a peer being opened
    /// holds its handle before it is recorded as open (its other devices' handshakes take a moment).
    let protectedNanoseconds: UInt64
    private var entries: [String: (handle: UInt64, lastUse: UInt64)] = [:]
    private var order: [String] = []

    init(capacity: Int, protectedNanoseconds: UInt64 = 2_000_000_000) {
        self.capacity = capacity
        self.protectedNanoseconds = protectedNanoseconds
    }

    /// The handle of an address already inserted (marking it used now).
    mutating func handle(of address: String, now: UInt64) -> UInt64? {
        guard let entry = entries[address] else { return nil }
        entries[address] = (entry.handle, now)
        return entry.handle
    }

    /// Forgets the oldest addresses that are neither in `inUse` nor recently used until one more
    /// fits; returns their handles (for fi_av_remove), or nil when none can go.
    mutating func makeRoom(keeping inUse: Set<UInt64>, now: UInt64) -> [UInt64]? {
        var removed: [UInt64] = []
        var index = 0
        while entries.count >= capacity {
            while index < order.count, let entry = entries[order[index]],
                  inUse.contains(entry.handle) || now &- entry.lastUse < protectedNanoseconds { index += 1 }
            guard index < order.count else { return nil }
            let address = order.remove(at: index)
            if let entry = entries.removeValue(forKey: address) { removed.append(entry.handle) }
        }
        return removed
    }

    /// Records an inserted address.
    mutating func insert(_ address: String, handle: UInt64, now: UInt64) {
        if entries.updateValue((handle, now), forKey: address) == nil { order.append(address) }
    }
}
