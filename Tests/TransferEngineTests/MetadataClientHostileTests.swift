import Foundation
import Testing
@testable import TransferEngine

/// Metadata clients against servers that trickle or stall: every exchange ends within the
/// metadata timeout in all (not per received byte), and one stalled redis reply holds up no
/// other command (no lock is held across the exchange).
@Suite("Metadata clients against slow servers", .serialized)
struct MetadataClientHostileTests {
    /// A server that answers each connection with `respond` (on its own thread) until stopped.
    final class FakeServer: @unchecked Sendable {
        let listener: Socket
        let port: UInt16
        init(respond: @escaping @Sendable (Socket) -> Void) throws {
            listener = try Socket.listen(host: "127.0.0.1", port: 0)
            port = listener.localAddress.port
            let listener = self.listener
            Thread.detachNewThread {
                while let connection = try? listener.accept() {
                    Thread.detachNewThread {
                        respond(connection)
                        connection.close()
                    }
                }
                listener.close()
            }
        }
        deinit { listener.shutdownBoth() }
    }

    /// Sends `text` one byte every 200 ms, for at most 6 s.
    static func trickle(_ text: String, on connection: Socket) {
        for byte in Array(text.utf8).prefix(30) {
            guard (try? [byte].withUnsafeBytes({ try connection.sendAll([$0]) })) != nil else { return }
            usleep(200_000)
        }
    }

    /// Reads one request's first bytes (enough for these tests).
    static func readRequest(_ connection: Socket) -> String {
        connection.setTimeouts(receiveMs: 2000, sendMs: 2000)
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = (try? buffer.withUnsafeMutableBytes { try connection.receiveSome($0.baseAddress!, count: $0.count) }) ?? 0
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }

    @Test("an HTTP or etcd server trickling its reply byte by byte: the request fails within the timeout in all")
    func tricklingHTTP() throws {
        let server = try FakeServer { connection in
            _ = Self.readRequest(connection)
            Self.trickle("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa\r\n\r\n{}", on: connection)
        }
        let http = try HTTPMetadataStore(url: "http://127.0.0.1:\(server.port)/metadata", timeoutMs: 1000)
        var started = Date()
        #expect(throws: (any Error).self) { _ = try http.get("mooncake/ram/x") }
        var took = Date().timeIntervalSince(started)
        #expect(took < 2, "the HTTP client took \(took) s against a 1 s timeout")
        let etcd = try EtcdMetadataStore(endpoints: ["127.0.0.1:\(server.port)"], timeoutMs: 1000)
        started = Date()
        #expect(throws: (any Error).self) { _ = try etcd.get("mooncake/ram/x") }
        took = Date().timeIntervalSince(started)
        #expect(took < 2, "the etcd client took \(took) s against a 1 s timeout")
    }

    @Test("redis: a trickled reply fails within the timeout; a stalled reply does not hold up another command")
    func redis() throws {
        let server = try FakeServer { connection in
            while true {
                let request = Self.readRequest(connection)
                if request.isEmpty { return }
                if request.contains("trickle") {
                    Self.trickle("$20\r\naaaaaaaaaaaaaaaaaaaa\r\n", on: connection)
                    return
                }
                if request.contains("stall") { usleep(1_500_000) }
                guard (try? Array("$2\r\n{}\r\n".utf8).withUnsafeBytes({ try connection.sendAll([$0]) })) != nil else { return }
            }
        }
        let store = try RedisMetadataStore(address: "127.0.0.1:\(server.port)", environment: [:], timeoutMs: 1000)
        var started = Date()
        #expect(throws: (any Error).self) { _ = try store.get("trickle") }
        let took = Date().timeIntervalSince(started)
        #expect(took < 2, "the redis client took \(took) s against a 1 s timeout")

        let stalled = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? store.get("stall")
            stalled.signal()
        }
        usleep(200_000)
        started = Date()
        #expect(try store.get("quick") == "{}")
        let quick = Date().timeIntervalSince(started)
        #expect(quick < 0.5, "a command waited \(quick) s behind a stalled one")
        _ = stalled.wait(timeout: .now() + 5)
    }
}
