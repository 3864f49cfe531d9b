import Logging

/// The embedded HTTP metadata server (`transfer-engine metadata-server`), with the
/// official servers' semantics: `GET|PUT|DELETE /metadata?key=K`, GET miss 404,
/// empty or missing key 400, PUT of an existing rpc_meta key 400 unless the body
/// is identical, DELETE miss 404, `GET /health` 200 "OK". HTTP/1.1 keep-alive;
/// one thread per connection, at most `maxConnections` at once and `Options.maxPerAddress`
/// from one address. Stricter than the official server where that costs a client nothing:
/// only `/metadata` and `/health` are served (404 otherwise); keys, values and their number are
/// bounded; with a token, PUT and DELETE (and, if asked, GET) need `Authorization: Bearer <token>`.
public final class MetadataHTTPServer: @unchecked Sendable {
    /// What the server accepts.
    public struct Options: Sendable {
        /// Required on PUT and DELETE when set (`--token`, MC_METADATA_TOKEN).
        public var token: String?
        /// Also require the token on GET.
        public var tokenForGet = false
        /// Longest key in bytes.
        public var maxKeyBytes = 4096
        /// Largest value in bytes (a descriptor with thousands of buffers is well under this).
        public var maxValueBytes = 16 << 20
        /// Most keys held.
        public var maxKeys = 100_000
        /// Connections at once from one address.
        public var maxPerAddress = 64

        /// Defaults: no token.
        public init(token: String? = nil, tokenForGet: Bool = false) {
            self.token = token
            self.tokenForGet = tokenForGet
        }
    }

    private let logger: Logger
    private let options: Options
    private let store = ConditionLock<[String: [UInt8]]>([:])
    private var acceptor: ConnectionAcceptor!
    /// Most connections served at once.
    public static let maxConnections = 512

    /// The bound port.
    public let port: UInt16

    /// Binds host:port (port 0 = any free port) and starts serving.
    public init(host: String, port: UInt16, options: Options = Options(), logger: Logger = Logger(label: "transfer-engine.metadata")) throws {
        let listener = try Socket.listen(host: host, port: port, backlog: 1024)
        self.logger = logger
        self.options = options
        self.port = listener.localAddress.port
        acceptor = try ConnectionAcceptor(listener: listener, limit: Self.maxConnections, perAddressLimit: options.maxPerAddress,
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
            let (status, body) = answer(method: request.startLine[0], target: request.startLine[1], body: request.body,
                                        authorization: request.headers["authorization"])
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
        case 401: return "Unauthorized"
        case 404: return "Not Found"
        case 413: return "Content Too Large"
        case 507: return "Insufficient Storage"
        default: return "Method Not Allowed"
        }
    }

    /// Whether the request carries the token, compared in constant time.
    private func authorized(_ header: String?) -> Bool {
        guard let token = options.token else { return true }
        let expected = Array("Bearer \(token)".utf8), given = Array((header ?? "").utf8)
        guard expected.count == given.count else { return false }
        return zip(expected, given).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// The official semantics, independent of the connection handling.
    func answer(method: String, target: String, body: [UInt8], authorization: String? = nil) -> (Int, [UInt8]) {
        let path = String(target.prefix { $0 != "?" })
        if path == "/health" { return method == "GET" ? (200, Array("OK".utf8)) : (405, []) }
        guard path == "/metadata" else { return (404, Array("only /metadata and /health are served".utf8)) }
        if method != "GET" || options.tokenForGet, !authorized(authorization) {
            return (401, Array("a valid 'Authorization: Bearer <token>' is required (MC_METADATA_TOKEN)".utf8))
        }
        guard let key = HTTPWire.queryValue("key", in: target), !key.isEmpty else {
            return (400, Array("missing or empty key".utf8))
        }
        guard key.utf8.count <= options.maxKeyBytes else { return (400, Array("key longer than \(options.maxKeyBytes) bytes".utf8)) }
        if method == "PUT", body.count > options.maxValueBytes {
            return (413, Array("value larger than \(options.maxValueBytes) bytes".utf8))
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
                if table[key] == nil, table.count >= options.maxKeys {
                    return (507, Array("the server holds \(options.maxKeys) keys already".utf8))
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
