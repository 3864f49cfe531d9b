/// "At most one warning every `interval`" for a repeating condition (a flood must not flood the
/// log too), counting what happened in between. Kept inside the caller's own locked state.
struct WarningThrottle {
    /// Nanoseconds between two warnings.
    var interval: UInt64 = 10_000_000_000
    private var last: UInt64 = 0
    private var since = 0

    /// Records one occurrence at `now` (monotonic ns); when a warning is due, how many occurred
    /// since the previous one (this one included), else nil.
    mutating func record(now: UInt64) -> Int? {
        since += 1
        guard last == 0 || now &- last >= interval else { return nil }
        defer { last = now; since = 0 }
        return since
    }
}
