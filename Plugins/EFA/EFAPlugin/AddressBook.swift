/// The peer addresses in one device's address vector, in insertion order, at most `capacity`.
struct AddressBook {
    let capacity: Int
    private var handles: [String: UInt64] = [:]
    private var order: [String] = []

    init(capacity: Int) { self.capacity = capacity }

    /// The handle of an address already inserted.
    func handle(of address: String) -> UInt64? { handles[address] }

    /// Forgets the oldest addresses whose handles are not in `inUse` until one more fits; returns
    /// their handles (for fi_av_remove), or nil when every address is in use.
    mutating func makeRoom(keeping inUse: Set<UInt64>) -> [UInt64]? {
        var removed: [UInt64] = []
        var index = 0
        while handles.count >= capacity {
            while index < order.count, let handle = handles[order[index]], inUse.contains(handle) { index += 1 }
            guard index < order.count else { return nil }
            let address = order.remove(at: index)
            if let handle = handles.removeValue(forKey: address) { removed.append(handle) }
        }
        return removed
    }

    /// Records an inserted address.
    mutating func insert(_ address: String, handle: UInt64) {
        if handles.updateValue(handle, forKey: address) == nil { order.append(address) }
    }
}
