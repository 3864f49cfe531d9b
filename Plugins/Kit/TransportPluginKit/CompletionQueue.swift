import CTransportABI
import DequeModule

/// Finished requests waiting for poll. Not locked: the plugin keeps it under the lock that
/// guards the work it completes.
public struct CompletionQueue {
    @usableFromInline var items = Deque<te_completion>()

    /// An empty queue.
    @inlinable public init() {}

    /// Whether nothing is waiting.
    @inlinable
    public var isEmpty: Bool { items.isEmpty }
    /// How many completions wait.
    @inlinable
    public var count: Int { items.count }

    /// Adds a completion.
    @inlinable
    public mutating func append(_ completion: te_completion) { items.append(completion) }

    /// Adds `cookie`'s completion with `status` and `bytes`.
    @inlinable
    public mutating func complete(_ cookie: UInt64, status: Int32, bytes: UInt64) {
        items.append(te_completion(cookie: cookie, status: status, flags: 0, bytes: bytes))
    }

    /// Moves as many completions as fit into `out`, oldest first; returns how many.
    @inlinable
    public mutating func drain(into out: CompletionArray) -> Int {
        let n = min(out.capacity, items.count)
        for i in 0..<n { out.store(items.removeFirst(), at: i) }
        return n
    }
}
