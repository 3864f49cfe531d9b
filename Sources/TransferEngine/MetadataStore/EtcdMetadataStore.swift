import FoundationEssentials

/// etcd as the metadata store, through the v3 JSON gateway (`/v3/kv/*`,
/// `/v3/lease/*`; etcd 3.4 as Debian ships it). Keys are attached to a lease
/// that the engine keeps alive, so a crashed engine's segment disappears after
/// the TTL (upstream leaves such keys behind). Several endpoints are tried in turn.
final class EtcdMetadataStore: MetadataStore, @unchecked Sendable {
    let endpoints: [HostPort]
    let timeoutMs: Int
    private let lease = ConditionLock<Int64?>(nil)
    /// User and password for an etcd with authentication on (MC_ETCD_USERNAME / MC_ETCD_PASSWORD).
    private let credentials: (user: String, password: String)?
    /// The token etcd handed out for them (renewed when etcd says it is no longer valid).
    private let token = ConditionLock<String?>(nil)

    init(endpoints: [String], timeoutMs: Int, credentials: (user: String, password: String)? = nil) throws {
        self.endpoints = try endpoints.map { text in
            let location = try HostPort.parse(text.hasPrefix("http://") ? String(text.dropFirst(7)) : text)
            return HostPort(host: location.host, port: location.port ?? 2379)
        }
        self.timeoutMs = timeoutMs
        self.credentials = credentials
    }

    /// Credentials from MC_ETCD_USERNAME and MC_ETCD_PASSWORD (both or neither).
    static func credentials(environment: [String: String]) throws -> (user: String, password: String)? {
        let user = environment["MC_ETCD_USERNAME"].flatMap { $0.isEmpty ? nil : $0 }
        let password = environment["MC_ETCD_PASSWORD"].flatMap { $0.isEmpty ? nil : $0 }
        switch (user, password) {
        case (nil, nil): return nil
        case let (user?, password?): return (user, password)
        default: throw EngineError.invalidConfiguration("set both MC_ETCD_USERNAME and MC_ETCD_PASSWORD, or neither")
        }
    }

    /// POSTs with the auth token when etcd wants one; an expired or revoked token is renewed once.
    private func call(_ path: String, _ body: JSONValue) throws -> JSONValue {
        guard let credentials else { return try send(path, body, token: nil) }
        func current() throws -> String {
            if let known = token.withLock({ $0 }) { return known }
            let reply = try send("/v3/auth/authenticate", .object(["name": .string(credentials.user), "password": .string(credentials.password)]), token: nil)
            guard let fresh = reply["token"]?.stringValue, !fresh.isEmpty else {
                throw MetadataRejection(description: "etcd did not issue a token for user '\(credentials.user)'")
            }
            token.withLock { $0 = fresh }
            return fresh
        }
        do {
            return try send(path, body, token: try current())
        } catch let error as EtcdError where error.message.contains("token") {
            token.withLock { $0 = nil }
            return try send(path, body, token: try current())
        }
    }

    var serverDescription: String { "etcd \(endpoints.map(\.description).joined(separator: ","))" }

    /// POSTs a JSON body to the first endpoint that answers.
    private func send(_ path: String, _ body: JSONValue, token: String?) throws -> JSONValue {
        var lastError: Error = MetadataRejection(description: "no etcd endpoint")
        for endpoint in endpoints {
            do {
                let socket = try Socket.connect(host: endpoint.host, port: endpoint.port ?? 2379, timeoutMs: timeoutMs)
                defer { socket.close() }
                socket.setTimeouts(receiveMs: timeoutMs, sendMs: timeoutMs)
                var headers = [("Host", endpoint.description), ("Connection", "close"), ("Content-Type", "application/json")]
                if let token { headers.append(("Authorization", token)) }
                let request = HTTPWire.encode(startLine: "POST \(path) HTTP/1.1", headers: headers, body: Array(body.compactText.utf8))
                try request.withUnsafeBytes { try socket.sendAll([$0]) }
                var buffered: [UInt8] = []
                // One exchange in all within the timeout: a server trickling its reply cannot hold us longer.
                let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutMs) * 1_000_000
                guard let response = try HTTPWire.read(from: socket, buffered: &buffered, deadline: deadline, callLimitMs: timeoutMs), let status = Int(response.startLine[1]) else {
                    throw HTTPWire.Failure.malformed("no response")
                }
                let json = try JSONValue.parse(response.body)
                guard status == 200 else {
                    let message = json["error"]?.stringValue ?? json["message"]?.stringValue ?? "HTTP \(status)"
                    throw EtcdError(message: message)
                }
                return json
            } catch let error as EtcdError {
                throw error
            } catch {
                lastError = error
            }
        }
        throw lastError
    }

    /// An error answer from etcd (not a transport failure).
    struct EtcdError: Error, CustomStringConvertible {
        var message: String
        var description: String { "etcd: \(message)" }
    }

    private static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    func get(_ key: String) throws -> String? {
        try attempt("GET", key) {
            let reply = try call("/v3/kv/range", .object(["key": .string(Self.base64(key))]))
            guard let first = reply["kvs"]?.arrayValue?.first, let value = first["value"]?.stringValue else { return nil }
            guard let data = Data(base64Encoded: value) else { throw EtcdError(message: "value of '\(key)' is not base64") }
            return String(decoding: data, as: UTF8.self)
        }
    }

    func put(_ key: String, _ value: String, ttlSeconds: Int?) throws {
        try attempt("PUT", key) {
            var body: [String: JSONValue] = ["key": .string(Self.base64(key)), "value": .string(Self.base64(value))]
            if let ttlSeconds { body["lease"] = .string(String(try currentLease(ttlSeconds: ttlSeconds))) }
            do {
                _ = try call("/v3/kv/put", .object(body))
            } catch let error as EtcdError where error.message.contains("lease not found") && ttlSeconds != nil {
                // The lease expired (e.g. etcd restarted): take a new one and write again.
                lease.withLock { $0 = nil }
                body["lease"] = .string(String(try currentLease(ttlSeconds: ttlSeconds!)))
                _ = try call("/v3/kv/put", .object(body))
            }
        }
    }

    func delete(_ key: String) throws {
        try attempt("DELETE", key) { _ = try call("/v3/kv/deleterange", .object(["key": .string(Self.base64(key))])) }
    }

    /// Extends our lease, or takes a new one when it expired.
    func refreshLease(ttlSeconds: Int) throws {
        guard let id = lease.withLock({ $0 }) else { return }
        let reply = try attempt("KEEPALIVE", "lease \(id)") { try call("/v3/lease/keepalive", .object(["ID": .string(String(id))])) }
        let ttl = reply["result"]?["TTL"].flatMap { $0.stringValue.flatMap { Int64($0) } ?? $0.uint64Value.map { Int64($0) } } ?? 0
        if ttl <= 0 { lease.withLock { $0 = nil } }  // expired: the next put grants a new one
    }

    private func currentLease(ttlSeconds: Int) throws -> Int64 {
        if let id = lease.withLock({ $0 }) { return id }
        let reply = try call("/v3/lease/grant", .object(["TTL": .string(String(ttlSeconds))]))
        guard let text = reply["ID"]?.stringValue, let id = Int64(text) else { throw EtcdError(message: "lease grant answered \(reply)") }
        lease.withLock { $0 = id }
        return id
    }
}
