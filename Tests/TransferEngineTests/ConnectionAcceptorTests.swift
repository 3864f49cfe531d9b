import Foundation
import Logging
import Testing
@testable import TransferEngine

/// The thread that accepts a connection serves it and a follower takes over accepting: every
/// connection still gets its own thread, and stop still ends them all.
@Suite("Connection acceptor (leader/follower)", .serialized)
struct ConnectionAcceptorTests {
    @Test("connections held open are served at once, each on its own thread; stop shuts them down and waits for their threads")
    func concurrentConnections() throws {
        let served = ConditionLock((started: 0, ended: 0))
        let listener = try Socket.listen(host: "127.0.0.1", port: 0)
        let acceptor = try ConnectionAcceptor(listener: listener, limit: 16, perAddressLimit: 16, name: "test", logger: Logger(label: "acceptor-test"),
                                              refuse: { _ in }) { connection in
            served.withLock(notify: true) { $0.started += 1 }
            var byte: UInt8 = 0
            // Until the client or stop ends the connection.
            while (try? connection.receiveSome(&byte, count: 1)).map({ $0 > 0 }) ?? false {}
            served.withLock(notify: true) { $0.ended += 1 }
        }
        var clients: [Socket] = []
        for _ in 0..<5 { clients.append(try Socket.connect(host: "127.0.0.1", port: listener.localAddress.port, timeoutMs: 2000)) }
        let deadline = MonotonicClock.nanoseconds() + 5_000_000_000
        #expect(served.wait(deadline: deadline) { $0.started == 5 ? true : nil } == true, "not every held connection was being served")
        #expect(acceptor.count == 5)
        // One more after some have ended: a follower still accepts.
        clients.removeFirst().close()
        #expect(served.wait(deadline: deadline) { $0.ended == 1 ? true : nil } == true)
        clients.append(try Socket.connect(host: "127.0.0.1", port: listener.localAddress.port, timeoutMs: 2000))
        #expect(served.wait(deadline: deadline) { $0.started == 6 ? true : nil } == true)
        acceptor.stop()
        #expect(served.withLock { $0.ended } == 6, "stop returned before every connection's thread ended")
        #expect(acceptor.count == 0)
        clients.forEach { $0.close() }
    }
}
