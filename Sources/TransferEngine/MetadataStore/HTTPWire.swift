/// Minimal HTTP/1.1 message framing shared by the metadata HTTP client and the
/// embedded metadata server: request/response heads, Content-Length and chunked
/// bodies, percent-encoding. Only what the metadata protocol needs.
enum HTTPWire {
    /// A parsed request or response head plus body.
    struct Message {
        /// Request: method, target, version. Response: version, status, reason.
        var startLine: [String]
        /// Header names lowercased.
        var headers: [String: String]
        var body: [UInt8]
    }

    /// Largest head or body accepted (metadata values are small).
    static let maxHead = 64 << 10
    static let maxBody = 64 << 20

    enum Failure: Error, CustomStringConvertible {
        case malformed(String)
        case tooLarge(String)
        var description: String {
            switch self {
            case .malformed(let what): return "malformed HTTP message: \(what)"
            case .tooLarge(let what): return "HTTP \(what) too large"
            }
        }
    }

    /// Reads one message from the socket. `buffered` carries bytes read past the previous
    /// message (keep-alive). Returns nil on a clean EOF before any byte.
    static func read(from socket: Socket, buffered: inout [UInt8], isResponseToHead: Bool = false,
                     deadline: UInt64? = nil, callLimitMs: Int = 0) throws -> Message? {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        func fill() throws -> Bool {
            let n = try chunk.withUnsafeMutableBytes { raw in
                if let deadline { return try socket.receiveSome(raw.baseAddress!, count: raw.count, deadline: deadline, callLimitMs: callLimitMs) }
                return try socket.receiveSome(raw.baseAddress!, count: raw.count)
            }
            if n == 0 { return false }
            buffered += chunk[0..<n]
            return true
        }
        // Head.
        var headEnd: Int?
        while headEnd == nil {
            if let range = buffered.firstRange(of: [13, 10, 13, 10]) { headEnd = range.lowerBound; break }
            if buffered.count > maxHead { throw Failure.tooLarge("head") }
            if try !fill() {
                if buffered.isEmpty { return nil }
                throw Failure.malformed("connection closed inside the head")
            }
        }
        let headText = String(decoding: buffered[0..<headEnd!], as: UTF8.self)
        buffered.removeSubrange(0..<(headEnd! + 4))
        var lines = headText.split(separator: "\r\n", omittingEmptySubsequences: false).map(String.init)
        guard !lines.isEmpty else { throw Failure.malformed("empty head") }
        let startLine = lines.removeFirst().split(separator: " ", maxSplits: 2).map(String.init)
        guard startLine.count >= 2 else { throw Failure.malformed("start line '\(startLine.joined(separator: " "))'") }
        var headers: [String: String] = [:]
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else { throw Failure.malformed("header '\(line)'") }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        // Body. Every length from the wire is checked against the cap before any arithmetic uses
        // it, and a message that frames its body twice (both headers) is refused, as a strict
        // server does: the two framings could disagree about where the next request starts.
        var body: [UInt8] = []
        let chunked = headers["transfer-encoding"].map { $0.lowercased().contains("chunked") } ?? false
        if headers["transfer-encoding"] != nil, headers["content-length"] != nil {
            throw Failure.malformed("both Transfer-Encoding and Content-Length")
        }
        if chunked {
            while true {
                while buffered.firstRange(of: [13, 10]) == nil {
                    if buffered.count > maxHead { throw Failure.tooLarge("chunk size line") }
                    if try !fill() { throw Failure.malformed("connection closed inside a chunked body") }
                }
                let lineEnd = buffered.firstRange(of: [13, 10])!.lowerBound
                let sizeText = (String(decoding: buffered[0..<lineEnd], as: UTF8.self).split(separator: ";", omittingEmptySubsequences: false).first
                    .map(String.init) ?? "").trimmingCharacters(in: .whitespaces)
                guard let size = hexLength(sizeText, limit: maxBody - body.count) else {
                    throw sizeText.isEmpty || sizeText.contains(where: { !$0.isHexDigit })
                        ? Failure.malformed("chunk size '\(sizeText.prefix(40))'") : Failure.tooLarge("body")
                }
                buffered.removeSubrange(0..<(lineEnd + 2))
                if size == 0 {
                    // The last chunk: trailer fields (etcd's gateway sends one) up to an empty line.
                    var trailerBytes = 0
                    while true {
                        while buffered.firstRange(of: [13, 10]) == nil {
                            if buffered.count > maxHead { throw Failure.tooLarge("trailer") }
                            if try !fill() { throw Failure.malformed("connection closed inside the trailer") }
                        }
                        let end = buffered.firstRange(of: [13, 10])!.lowerBound
                        buffered.removeSubrange(0..<(end + 2))
                        trailerBytes += end + 2
                        if end == 0 { break }
                        if trailerBytes > maxHead { throw Failure.tooLarge("trailer") }
                    }
                    break
                }
                while buffered.count < size + 2 { if try !fill() { throw Failure.malformed("connection closed inside a chunk") } }
                guard buffered[size] == 13, buffered[size + 1] == 10 else { throw Failure.malformed("chunk not followed by CRLF") }
                body += buffered[0..<size]
                buffered.removeSubrange(0..<(size + 2))
            }
        } else if let lengthText = headers["content-length"] {
            guard let length = decimalLength(lengthText) else { throw Failure.malformed("Content-Length '\(lengthText.prefix(40))'") }
            guard length <= maxBody else { throw Failure.tooLarge("body") }
            while buffered.count < length { if try !fill() { throw Failure.malformed("connection closed inside the body") } }
            body = Array(buffered[0..<length])
            buffered.removeSubrange(0..<length)
        } else if startLine[0].hasPrefix("HTTP/"), !isResponseToHead {
            // A response without length: the body runs to EOF.
            while try fill() { if buffered.count > maxBody { throw Failure.tooLarge("body") } }
            body = buffered
            buffered.removeAll()
        }
        return Message(startLine: startLine, headers: headers, body: body)
    }

    /// A chunk size: hex digits only, at most `limit`; nil when malformed or larger (never traps:
    /// the digits are accumulated with an explicit bound, not parsed into an unbounded integer).
    static func hexLength(_ text: String, limit: Int) -> Int? {
        guard !text.isEmpty, text.count <= 16 else { return nil }
        var value = 0
        for character in text {
            guard let digit = character.hexDigitValue else { return nil }
            value = value * 16 + digit
            if value > limit { return nil }
        }
        return value
    }

    /// A Content-Length: decimal digits only (no sign, no spaces inside); nil otherwise.
    static func decimalLength(_ text: String) -> Int? {
        guard !text.isEmpty, text.count <= 18, text.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        return Int(text)
    }

    /// Serialises a message head and body.
    static func encode(startLine: String, headers: [(String, String)], body: [UInt8]) -> [UInt8] {
        var text = startLine + "\r\n"
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        text += "Content-Length: \(body.count)\r\n\r\n"
        return Array(text.utf8) + body
    }

    /// Percent-encodes every byte outside RFC 3986's unreserved set (as curl_easy_escape).
    static func percentEncode(_ text: String) -> String {
        let hex = Array("0123456789ABCDEF")
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(Character(Unicode.Scalar(byte)))
            default:
                out += "%" + String(hex[Int(byte >> 4)]) + String(hex[Int(byte & 15)])
            }
        }
        return out
    }
}
