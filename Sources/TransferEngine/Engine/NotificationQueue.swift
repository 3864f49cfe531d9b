import DequeModule

/// Notifications received and not yet taken by the application, bounded in count and bytes: a
/// peer that sends faster than they are taken costs us the oldest ones, never unbounded memory.
struct NotificationQueue {
    /// Most notifications held (MC_NOTIFY_MAX_COUNT).
    let maxCount: Int
    /// Most bytes of names and messages held (MC_NOTIFY_MAX_BYTES).
    let maxBytes: Int
    private var items: Deque<TransferNotification> = []
    private var bytes = 0
    /// Notifications dropped since the engine started.
    private(set) var dropped: UInt64 = 0
    /// Drop warnings, at most every 10 s.
    var dropWarnings = WarningThrottle()

    init(maxCount: Int, maxBytes: Int) {
        self.maxCount = maxCount
        self.maxBytes = maxBytes
    }

    private static func size(_ notification: TransferNotification) -> Int {
        notification.name.utf8.count + notification.message.utf8.count
    }

    /// Queues `notification`, dropping the oldest ones to stay within both limits (or the new one,
    /// when it alone is larger than the byte limit); returns how many were dropped.
    mutating func append(_ notification: TransferNotification) -> Int {
        let size = Self.size(notification)
        guard size <= maxBytes, maxCount > 0 else {
            dropped += 1
            return 1
        }
        var droppedNow = 0
        while !items.isEmpty, items.count >= maxCount || bytes + size > maxBytes {
            bytes -= Self.size(items.removeFirst())
            droppedNow += 1
        }
        items.append(notification)
        bytes += size
        dropped += UInt64(droppedNow)
        return droppedNow
    }

    /// Every queued notification, oldest first; the queue is empty afterwards.
    mutating func takeAll() -> [TransferNotification] {
        defer { items.removeAll(); bytes = 0 }
        return Array(items)
    }
}
