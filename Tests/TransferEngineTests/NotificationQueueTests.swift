import Foundation
import Testing
@testable import TransferEngine

/// Notifications a peer sends are held until the application takes them, within a count and a
/// byte limit: a peer sending faster costs the oldest ones (counted, warned about once per 10 s),
/// never unbounded memory (300 notifies of 1 MiB once grew a `serve` process by 330 MB).
@Suite("Bounded notification queue")
struct NotificationQueueTests {
    @Test("count and byte limits drop the oldest; a notification larger than the byte limit is dropped itself")
    func limits() throws {
        let (logger, capture) = TestSupport.capturingLogger()
        let target = try TransferEngine(configuration: EngineConfiguration(),
                                        environment: TestSupport.cleanEnvironment(["MC_NOTIFY_MAX_COUNT": "10", "MC_NOTIFY_MAX_BYTES": "4096"]),
                                        logger: logger)
        defer { target.shutdown() }
        let sender = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { sender.shutdown() }
        let handle = try sender.openSegment(target.segmentName)
        let small = String(repeating: "m", count: 98)
        for i in 0..<30 { try sender.sendNotification(TransferNotification(name: "n\(i)", message: small), to: handle) }
        try sender.sendNotification(TransferNotification(name: "huge", message: String(repeating: "h", count: 5000)), to: handle)
        let kept = target.takeNotifications()
        #expect(kept.map(\.name) == (20..<30).map { "n\($0)" })
        #expect(target.droppedNotifications == 21)
        // The byte limit: 1000-byte messages, at most four fit in 4096 bytes.
        let large = String(repeating: "L", count: 1000)
        for i in 0..<6 { try sender.sendNotification(TransferNotification(name: "b\(i)", message: large), to: handle) }
        #expect(target.takeNotifications().map(\.name) == ["b2", "b3", "b4", "b5"])
        #expect(target.droppedNotifications == 23)
        #expect(target.takeNotifications().isEmpty)
        let warnings = capture.messages(at: .warning).filter { $0.contains("notification queue full") }
        #expect(warnings.count == 1, "\(warnings)")  // rate-limited: one in this burst
        #expect(throws: EngineError.self) {
            _ = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment(["MC_NOTIFY_MAX_COUNT": "0"]))
        }
    }
}
