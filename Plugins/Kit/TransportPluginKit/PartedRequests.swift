import CTransportABI

/// Requests cut into parts (slices, pieces, chunks): each completes when its last part ends,
/// with the first failure's status and the bytes its successful parts moved. Not locked: the
/// plugin keeps it under the lock that guards its completions.
public struct PartedRequests {
    @usableFromInline
    struct Parent {
        @usableFromInline var cookie: UInt64
        @usableFromInline var remaining: Int
        @usableFromInline var status: Int32
        @usableFromInline var bytes: UInt64

        @inlinable
        init(cookie: UInt64, remaining: Int) {
            self.cookie = cookie
            self.remaining = remaining
            status = TE_OK
            bytes = 0
        }
    }

    @usableFromInline var parents: [UInt64: Parent] = [:]
    @usableFromInline var next: UInt64 = 1

    /// No request in parts.
    @inlinable public init() {}

    /// A number for the next request (never 0, which callers may keep for "not cut").
    @inlinable
    public mutating func newID() -> UInt64 {
        defer { next &+= 1 }
        return next
    }

    /// Tracks request `id` (from `newID`) with `cookie`, cut into `parts` parts (at least 1).
    @inlinable
    public mutating func open(_ id: UInt64, cookie: UInt64, parts: Int) {
        parents[id] = Parent(cookie: cookie, remaining: max(parts, 1))
    }

    /// A part of `id` ended; the request's completion when it was the last part, else nil (nil
    /// too for an id not tracked).
    @inlinable
    public mutating func partEnded(_ id: UInt64, status: Int32, bytes: UInt64) -> te_completion? {
        guard var parent = parents[id] else { return nil }
        parent.remaining -= 1
        if status == TE_OK { parent.bytes &+= bytes } else if parent.status == TE_OK { parent.status = status }
        guard parent.remaining <= 0 else {
            parents[id] = parent
            return nil
        }
        parents.removeValue(forKey: id)
        return te_completion(cookie: parent.cookie, status: parent.status, flags: 0, bytes: parent.bytes)
    }

}
