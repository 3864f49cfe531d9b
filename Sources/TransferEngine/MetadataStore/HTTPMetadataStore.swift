/// The official HTTP metadata protocol as a client: `GET/PUT/DELETE <url>?key=<percent-encoded key>`,
/// JSON bodies, and only status 200 counts as success (404 on GET = absent).
struct HTTPMetadataStore: MetadataStore {
    let url: String
    let host: String
    let port: UInt16
    let path: String
    let timeoutMs: Int
    /// Sent as `Authorization: Bearer <token>` when set (MC_METADATA_TOKEN).
    let token: String?

    init(url: String, timeoutMs: Int, token: String? = nil) throws {
        self.token = token
        guard url.lowercased().hasPrefix("http://") else {
            throw EngineError.invalidMetadataServer("'\(url)': https:// metadata servers are not supported yet (no TLS in this build); use http://")
        }
        let rest = url.dropFirst(7)
        let authority = rest.prefix { $0 != "/" }
        let location = try HostPort.parse(String(authority))
        self.url = url
        host = location.host
        port = location.port ?? 80
        path = rest.count > authority.count ? String(rest.dropFirst(authority.count)) : "/"
        self.timeoutMs = timeoutMs
    }

    var serverDescription: String { "HTTP metadata server \(url)" }

    private func request(_ method: String, _ key: String, body: String? = nil) throws -> (Int, String) {
        let target = path + (path.contains("?") ? "&" : "?") + "key=" + HTTPWire.percentEncode(key)
        let socket = try Socket.connect(host: host, port: port, timeoutMs: timeoutMs)
        defer { socket.close() }
        socket.setTimeouts(receiveMs: timeoutMs, sendMs: timeoutMs)
        var headers = [("Host", "\(host):\(port)"), ("Connection", "close")]
        if body != nil { headers.append(("Content-Type", "application/json")) }
        if let token { headers.append(("Authorization", "Bearer \(token)")) }
        let message = HTTPWire.encode(startLine: "\(method) \(target) HTTP/1.1", headers: headers, body: Array((body ?? "").utf8))
        try message.withUnsafeBytes { try socket.sendAll([$0]) }
        var buffered: [UInt8] = []
        // One exchange in all within the timeout: a server trickling its reply cannot hold us longer.
        let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutMs) * 1_000_000
        guard let response = try HTTPWire.read(from: socket, buffered: &buffered, deadline: deadline, callLimitMs: timeoutMs), let status = Int(response.startLine[1]) else {
            throw HTTPWire.Failure.malformed("no response")
        }
        return (status, String(decoding: response.body, as: UTF8.self))
    }

    private func failure(_ operation: String, _ key: String, _ reason: String) -> MetadataFailure {
        MetadataFailure(server: serverDescription, operation: operation, key: key, reason: reason)
    }

    func get(_ key: String) throws -> String? {
        let (status, body) = try attempt("GET", key) { try request("GET", key) }
        if status == 404 { return nil }
        guard status == 200 else { throw failure("GET", key, "HTTP \(status) \(body.prefix(200))") }
        return body
    }

    func put(_ key: String, _ value: String, ttlSeconds: Int?) throws {
        let (status, body) = try attempt("PUT", key) { try request("PUT", key, body: value) }
        guard status == 200 else {
            let error = failure("PUT", key, "HTTP \(status) \(body.prefix(200))")
            if (400..<500).contains(status) { throw MetadataRejection(description: error.description) }
            throw error
        }
    }

    func delete(_ key: String) throws {
        let (status, body) = try attempt("DELETE", key) { try request("DELETE", key) }
        guard status == 200 || status == 404 else { throw failure("DELETE", key, "HTTP \(status) \(body.prefix(200))") }
    }
}
