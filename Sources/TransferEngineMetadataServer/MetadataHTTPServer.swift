import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The embedded HTTP metadata server (`transfer-engine metadata-server`), with the
/// official servers' semantics: `GET|PUT|DELETE /metadata?key=K`, GET miss 404,
/// empty or missing key 400, PUT of an existing rpc_meta key 400 unless the body
/// is identical, DELETE miss 404, `GET /health` 200 "OK". HTTP/1.1 keep-alive.
///
/// HTTP is parsed and framed by swift-nio's codec on one event-loop thread, so idle or slow
/// clients hold no thread: each request must arrive whole within `requestTimeoutMs` of the
/// connection being ready for it (opened, or the previous answer sent), else the connection is
/// closed; a request is refused from its head (path, method, token, length) before its body is
/// read; a client that does not read its answers is not answered further until it does; one
/// address holds at most `maxPerAddress` connections, and at `maxConnections` the oldest
/// connection makes room for the new one.
/// Stricter than the official server where that costs a client nothing: only `/metadata` and
/// `/health` are served (404 otherwise); keys, values and their number are bounded; with a
/// token, PUT and DELETE (and, if asked, GET) need `Authorization: Bearer <token>`.
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
        /// Connections at once; beyond, the oldest is closed.
        public var maxConnections = 4096
        /// A request (head and body) must arrive within this of the connection being ready for it.
        public var requestTimeoutMs: Int64 = 30_000
        /// Told of every answer sent, refusals included: the request's method ("-" when none
        /// arrived) and the status (the metrics endpoint counts them).
        public var onRequest: (@Sendable (String, Int) -> Void)?

        /// Defaults: no token.
        public init(token: String? = nil, tokenForGet: Bool = false) {
            self.token = token
            self.tokenForGet = tokenForGet
        }
    }

    let options: Options
    private let store = NIOLockedValueBox<[String: [UInt8]]>([:])
    private let answers: Answers
    private let server: HTTPListener
    var connections: ConnectionTable { server.connections }

    /// The bound port.
    public var port: UInt16 { server.port }

    /// Binds host:port (port 0 = any free port) and starts serving.
    public init(host: String, port: UInt16, options: Options = Options(), logger: Logger = Logger(label: "transfer-engine.metadata")) throws {
        self.options = options
        answers = Answers(options: options, store: store)
        server = try HTTPListener(host: host, port: port, responder: answers, maxConnections: options.maxConnections,
                                  maxPerAddress: options.maxPerAddress, logger: logger)
    }

    /// Number of keys held.
    public var keyCount: Int { store.withLockedValue { $0.count } }

    /// Stops accepting, closes every connection and ends the event loop.
    public func stop() { server.stop() }

    /// The official semantics, independent of the connection handling.
    func answer(method: String, target: String, body: [UInt8], authorization: String? = nil) -> (Int, [UInt8]) {
        let reply = answers.answer(method: method, target: target, body: body, authorization: authorization)
        return (reply.status, reply.body)
    }
}

/// The answers to requests: the store and the rules, shared by every connection.
struct Answers: HTTPResponder {
    let options: MetadataHTTPServer.Options
    let store: NIOLockedValueBox<[String: [UInt8]]>

    var maxBodyBytes: Int { options.maxValueBytes }

    func answered(method: String, status: Int) { options.onRequest?(method, status) }
    var requestTimeoutMs: Int64 { options.requestTimeoutMs }

    /// Whether the request carries the token, compared in constant time.
    private func authorized(_ header: String?) -> Bool {
        guard let token = options.token else { return true }
        let expected = Array("Bearer \(token)".utf8), given = Array((header ?? "").utf8)
        guard expected.count == given.count else { return false }
        return zip(expected, given).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// A refusal decided from the request's head alone, before any of its body is read.
    func refusal(method: String, target: String, authorization: String?, contentLength: Int?, chunked: Bool) -> (Int, [UInt8])? {
        let path = String(target.prefix { $0 != "?" })
        if path == "/health" { return method == "GET" ? nil : (405, []) }
        guard path == "/metadata" else { return (404, Array("only /metadata and /health are served".utf8)) }
        if method != "GET" || options.tokenForGet, !authorized(authorization) {
            return (401, Array("a valid 'Authorization: Bearer <token>' is required (MC_METADATA_TOKEN)".utf8))
        }
        switch method {
        case "PUT":
            if let contentLength, contentLength > options.maxValueBytes { return (413, Array("value larger than \(options.maxValueBytes) bytes".utf8)) }
            return nil
        case "GET", "DELETE":
            return (contentLength ?? 0) > 0 || chunked ? (400, Array("\(method) takes no body".utf8)) : nil
        default:
            return (405, Array("use GET, PUT or DELETE".utf8))
        }
    }

    /// The answer to a whole request (JSON for a successful GET).
    func answer(method: String, target: String, body: [UInt8], authorization: String?) -> (status: Int, body: [UInt8], contentType: String) {
        let (status, reply) = answerBody(method: method, target: target, body: body, authorization: authorization)
        return (status, reply, status == 200 && method == "GET" ? "application/json" : "text/plain")
    }

    /// The head's rules (`refusal`, with the body's real length), then the key and the store.
    private func answerBody(method: String, target: String, body: [UInt8], authorization: String?) -> (Int, [UInt8]) {
        if let refused = refusal(method: method, target: target, authorization: authorization, contentLength: body.count, chunked: false) {
            return refused
        }
        if target.prefix(while: { $0 != "?" }) == "/health" { return (200, Array("OK".utf8)) }
        guard let key = Query.value("key", in: target), !key.isEmpty else {
            return (400, Array("missing or empty key".utf8))
        }
        guard key.utf8.count <= options.maxKeyBytes else { return (400, Array("key longer than \(options.maxKeyBytes) bytes".utf8)) }
        switch method {
        case "GET":
            guard let value = store.withLockedValue({ $0[key] }) else { return (404, Array("metadata not found".utf8)) }
            return (200, value)
        case "PUT":
            return store.withLockedValue { table in
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
            return store.withLockedValue { $0.removeValue(forKey: key) } != nil ? (200, Array("metadata deleted".utf8)) : (404, Array("metadata not found".utf8))
        default:
            return (405, Array("use GET, PUT or DELETE".utf8))
        }
    }
}
