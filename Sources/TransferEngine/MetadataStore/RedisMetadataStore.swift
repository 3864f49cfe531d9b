/// Redis as the metadata store: GET/SET/DEL over RESP, as the official engine
/// uses it, with `SET ... EX ttl` so a crashed engine's keys expire.
/// Authentication and database: MC_REDIS_USERNAME, MC_REDIS_PASSWORD, MC_REDIS_DB_INDEX.
final class RedisMetadataStore: MetadataStore, @unchecked Sendable {
    let host: String
    let port: UInt16
    let timeoutMs: Int
    private let username: String?
    private let password: String?
    private let database: Int?
    /// Connections not in use. A command takes one (or opens one) and gives it back after its
    /// exchange, so no lock is held across network I/O and a slow reply delays no other command.
    private let idle = ConditionLock<[Socket]>([])
    /// Idle connections kept beyond this are closed.
    static let maxIdle = 4

    init(address: String, environment: [String: String], timeoutMs: Int) throws {
        let location = try HostPort.parse(address)
        host = location.host
        port = location.port ?? 6379
        self.timeoutMs = timeoutMs
        username = environment["MC_REDIS_USERNAME"].flatMap { $0.isEmpty ? nil : $0 }
        password = environment["MC_REDIS_PASSWORD"].flatMap { $0.isEmpty ? nil : $0 }
        database = try environment["MC_REDIS_DB_INDEX"].flatMap { $0.isEmpty ? nil : $0 }.map { text in
            guard let index = Int(text), index >= 0 else { throw EngineError.invalidConfiguration("MC_REDIS_DB_INDEX='\(text)' is not a database index") }
            return index
        }
    }

    var serverDescription: String { "redis \(HostPort(host: host, port: port))" }

    /// A RESP reply.
    enum Reply: Equatable {
        case simple(String), error(String), integer(Int64), bulk([UInt8]?), array([Reply]?)
    }

    /// Sends one command on an idle connection, or a new one; a connection that failed is closed.
    func command(_ arguments: [String]) throws -> Reply {
        let socket = try idle.withLock { $0.popLast() } ?? open()
        let reply: Reply
        do { reply = try exchange(arguments, on: socket) } catch {
            socket.close()
            throw error
        }
        let kept = idle.withLock { connections -> Bool in
            guard connections.count < Self.maxIdle else { return false }
            connections.append(socket)
            return true
        }
        if !kept { socket.close() }
        return reply
    }

    private func open() throws -> Socket {
        let socket = try Socket.connect(host: host, port: port, timeoutMs: timeoutMs)
        socket.setTimeouts(receiveMs: timeoutMs, sendMs: timeoutMs)
        if let password {
            let reply = try exchange(username.map { ["AUTH", $0, password] } ?? ["AUTH", password], on: socket)
            if case .error(let text) = reply { throw MetadataRejection(description: "\(serverDescription): AUTH refused: \(text)") }
        }
        if let database {
            let reply = try exchange(["SELECT", String(database)], on: socket)
            if case .error(let text) = reply { throw MetadataRejection(description: "\(serverDescription): SELECT \(database) refused: \(text)") }
        }
        return socket
    }

    private func exchange(_ arguments: [String], on socket: Socket) throws -> Reply {
        // One exchange in all within the timeout: a server trickling its reply cannot hold us longer.
        socket.restoreTimeouts(timeoutMs)
        let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutMs) * 1_000_000
        var out: [UInt8] = Array("*\(arguments.count)\r\n".utf8)
        for argument in arguments {
            let bytes = Array(argument.utf8)
            out += Array("$\(bytes.count)\r\n".utf8) + bytes + [13, 10]
        }
        try out.withUnsafeBytes { try socket.sendAll([$0], deadline: deadline, callLimitMs: timeoutMs) }
        var reader = LineReader(socket: socket, deadline: deadline, callLimitMs: timeoutMs)
        return try reader.reply()
    }

    /// Reads RESP replies from a socket, buffering.
    struct LineReader {
        let socket: Socket
        /// The exchange's total deadline (monotonic ns), and the socket's own per-call timeout.
        var deadline: UInt64? = nil
        var callLimitMs = 0
        var buffer: [UInt8] = []

        mutating func fill() throws {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let (deadline, limit) = (self.deadline, callLimitMs)
            let n = try chunk.withUnsafeMutableBytes { raw in
                if let deadline { return try socket.receiveSome(raw.baseAddress!, count: raw.count, deadline: deadline, callLimitMs: limit) }
                return try socket.receiveSome(raw.baseAddress!, count: raw.count)
            }
            guard n > 0 else { throw SocketError.closedByPeer(expected: 1, received: 0) }
            buffer += chunk[0..<n]
        }

        mutating func line() throws -> String {
            while true {
                if let range = buffer.firstRange(of: [13, 10]) {
                    let text = String(decoding: buffer[0..<range.lowerBound], as: UTF8.self)
                    buffer.removeSubrange(0..<range.upperBound)
                    return text
                }
                if buffer.count > 1 << 20 { throw HTTPWire.Failure.tooLarge("redis line") }
                try fill()
            }
        }

        mutating func reply(depth: Int = 0) throws -> Reply {
            guard depth < 16 else { throw HTTPWire.Failure.malformed("redis reply nested too deeply") }
            let text = try line()
            guard let kind = text.first else { throw HTTPWire.Failure.malformed("empty redis reply") }
            let rest = String(text.dropFirst())
            switch kind {
            case "+": return .simple(rest)
            case "-": return .error(rest)
            case ":": return .integer(Int64(rest) ?? 0)
            case "$":
                guard let length = Int(rest), length <= 64 << 20 else { throw HTTPWire.Failure.malformed("redis bulk length '\(rest)'") }
                if length < 0 { return .bulk(nil) }
                while buffer.count < length + 2 { try fill() }
                let bytes = Array(buffer[0..<length])
                buffer.removeSubrange(0..<(length + 2))
                return .bulk(bytes)
            case "*":
                guard let count = Int(rest), count <= 1 << 20 else { throw HTTPWire.Failure.malformed("redis array length '\(rest)'") }
                if count < 0 { return .array(nil) }
                return .array(try (0..<count).map { _ in try reply(depth: depth + 1) })
            default:
                throw HTTPWire.Failure.malformed("redis reply type '\(kind)'")
            }
        }
    }

    private func failure(_ operation: String, _ key: String, _ reason: String) -> MetadataFailure {
        MetadataFailure(server: serverDescription, operation: operation, key: key, reason: reason)
    }

    func get(_ key: String) throws -> String? {
        switch try attempt("GET", key, { try command(["GET", key]) }) {
        case .bulk(let bytes): return bytes.map { String(decoding: $0, as: UTF8.self) }
        case .error(let text): throw failure("GET", key, text)
        case let other: throw failure("GET", key, "unexpected reply \(other)")
        }
    }

    func put(_ key: String, _ value: String, ttlSeconds: Int?) throws {
        var arguments = ["SET", key, value]
        if let ttlSeconds { arguments += ["EX", String(ttlSeconds)] }
        switch try attempt("SET", key, { try command(arguments) }) {
        case .simple: return
        case .error(let text): throw failure("SET", key, text)
        case let other: throw failure("SET", key, "unexpected reply \(other)")
        }
    }

    func delete(_ key: String) throws {
        if case .error(let text) = try attempt("DEL", key, { try command(["DEL", key]) }) { throw failure("DEL", key, text) }
    }
}
