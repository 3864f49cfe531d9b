import Logging

/// The embedded HTTP metadata server (`transfer-engine metadata-server`), with the
/// official servers' semantics: `GET|PUT|DELETE /metadata?key=K`, GET miss 404,
/// empty or missing key 400, PUT of an existing rpc_meta key 400 unless the body
/// is identical, DELETE miss 404, `GET /health` 200 "OK". HTTP/1.1 keep-alive;
/// one thread per connection, at most `maxConnections` at once.
public final class MetadataHTTPServer: @unchecked Sendable {
    private let logger: Logger
    private let store = ConditionLock<[String: [UInt8]]>([:])
    private var acceptor: ConnectionAcceptor!
    /// Most connections served at once.
    public static let maxConnections = 512

    /// The bound port.
    public let port: UInt16

    /// Binds host:port (port 0 = any free port) and starts serving.
    public init(host: String, port: UInt16, logger: Logger = Logger(label: "transfer-engine.metadata")) throws {
        let listener = try Socket.listen(host: host, port: port, backlog: 1024)
        self.logger = logger
        self.port = listener.localAddress.port
        acceptor = try ConnectionAcceptor(listener: listener, limit: Self.maxConnections, perAddressLimit: Self.maxConnections,
                                          name: "metadata http", logger: logger,
            refuse: { connection in
                let busy = HTTPWire.encode(startLine: "HTTP/1.1 503 Service Unavailable", headers: [("Connection", "close")], body: Array("too many connections".utf8))
                _ = try? busy.withUnsafeBytes { try connection.sendAll([$0]) }
            },
            serve: { [weak self] connection in self?.serve(connection) })
    }

    /// Number of keys held.
    public var keyCount: Int { store.withLock { $0.count } }

    /// Stops accepting and closes every connection.
    public func stop() { acceptor.stop() }

    private func serve(_ connection: Socket) {
        connection.setTimeouts(receiveMs: 60_000, sendMs: 10_000)
        var buffered: [UInt8] = []
        while true {
            let request: HTTPWire.Message
            do {
                guard let message = try HTTPWire.read(from: connection, buffered: &buffered) else { return }
                request = message
            } catch {
                let reply = HTTPWire.encode(startLine: "HTTP/1.1 400 Bad Request", headers: [("Connection", "close")], body: Array("\(error)".utf8))
                _ = try? reply.withUnsafeBytes { try connection.sendAll([$0]) }
                return
            }
            let (status, body) = answer(method: request.startLine[0], target: request.startLine[1], body: request.body)
            let close = request.headers["connection"]?.lowercased() == "close" || request.startLine.last == "HTTP/1.0"
            var headers = [("Content-Type", status == 200 && request.startLine[0] == "GET" ? "application/json" : "text/plain")]
            if close { headers.append(("Connection", "close")) }
            let reply = HTTPWire.encode(startLine: "HTTP/1.1 \(status) \(Self.reason(status))", headers: headers, body: body)
            do { try reply.withUnsafeBytes { try connection.sendAll([$0]) } } catch { return }
            if close { return }
        }
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 400: return "Bad Request"
        case 404: return "Not Found"
        default: return "Method Not Allowed"
        }
    }

    /// The official semantics, independent of the connection handling.
    func answer(method: String, target: String, body: [UInt8]) -> (Int, [UInt8]) {
        let path = String(target.prefix { $0 != "?" })
        if path == "/health" { return method == "GET" ? (200, Array("OK".utf8)) : (405, []) }
        guard let key = HTTPWire.queryValue("key", in: target), !key.isEmpty else {
            return (400, Array("missing or empty key".utf8))
        }
        switch method {
        case "GET":
            guard let value = store.withLock({ $0[key] }) else { return (404, Array("metadata not found".utf8)) }
            return (200, value)
        case "PUT":
            return store.withLock { table in
                if key.contains("rpc_meta"), let existing = table[key], existing != body {
                    return (400, Array("Duplicate rpc_meta key not allowed".utf8))
                }
                table[key] = body
                return (200, Array("metadata updated".utf8))
            }
        case "DELETE":
            return store.withLock { $0.removeValue(forKey: key) } != nil ? (200, Array("metadata deleted".utf8)) : (404, Array("metadata not found".utf8))
        default:
            return (405, Array("use GET, PUT or DELETE".utf8))
        }
    }
}
