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

    @Test("stop while peers keep connecting: no connection is served after stop returned, and the acceptor accepts nothing after it (30 rounds)")
    func stopWhileConnecting() throws {
        for _ in 0..<30 {
            let state = ConditionLock((stopReturned: false, servedAfterStop: 0, served: 0))
            let listener = try Socket.listen(host: "127.0.0.1", port: 0)
            let port = listener.localAddress.port
            let acceptor = try ConnectionAcceptor(listener: listener, limit: 64, perAddressLimit: 64, name: "test",
                                                  logger: Logger(label: "acceptor-test"), refuse: { _ in }) { connection in
                state.withLock { if $0.stopReturned { $0.servedAfterStop += 1 }; $0.served += 1 }
                var byte: UInt8 = 0
                while (try? connection.receiveSome(&byte, count: 1)).map({ $0 > 0 }) ?? false {}
            }
            let clients = ConditionLock([Socket]())
            let connecting = ConditionLock(true)
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                // Bounded: at most 200 connections, until told to stop.
                for _ in 0..<200 where connecting.withLock({ $0 }) {
                    if let socket = try? Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 200) { clients.withLock { $0.append(socket) } }
                }
                done.signal()
            }
            usleep(UInt32.random(in: 200...3000))
            acceptor.stop()
            state.withLock { $0.stopReturned = true }
            usleep(20_000)
            connecting.withLock { $0 = false }
            done.wait()
            #expect(state.withLock { $0.servedAfterStop } == 0)
            #expect(acceptor.count == 0)
            clients.withLock { $0.forEach { $0.close() } }
        }
    }
}
