import NIOCore
import NIOHTTP1

/// What a server built on `RequestHandler` answers, and its limits.
protocol HTTPResponder: Sendable {
    /// Largest request body read.
    var maxBodyBytes: Int { get }
    /// A request must arrive whole within this of the connection being ready for it.
    var requestTimeoutMs: Int64 { get }
    /// A refusal decided from the request's head alone, before any of its body is read.
    func refusal(method: String, target: String, authorization: String?, contentLength: Int?, chunked: Bool) -> (Int, [UInt8])?
    /// The answer to a whole request: status, body and content type.
    func answer(method: String, target: String, body: [UInt8], authorization: String?) -> (status: Int, body: [UInt8], contentType: String)
    /// Told of every answer sent, refusals included (method "-" when none arrived).
    func answered(method: String, status: Int)
}

extension HTTPResponder {
    func answered(method: String, status: Int) {}
}

/// One connection's requests, after swift-nio's HTTP/1.1 codec: refuses a request from its head
/// when it can, collects a body (bounded), answers, and closes a connection whose next request
/// does not arrive whole in time. A client that does not read its answers gets no further answer
/// until it does (the codec hands over one pipelined request at a time, so at most one waits).
final class RequestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// How long a connection being closed may still take to send its last answer.
    static let closeGraceMs: Int64 = 2000

    private let answers: any HTTPResponder
    private var head: HTTPRequestHead?
    /// The method of the request being answered (for `answered`).
    private var method = "-"
    private var body: [UInt8] = []
    /// A request answered already from its head: the rest of it is read and dropped.
    private var refusedEarly = false
    /// A complete request waiting for the client to read the previous answers.
    private var waiting: (HTTPRequestHead, [UInt8])?
    /// Set once the connection is being closed: its further input is ignored.
    private var closing = false
    private var deadline: Scheduled<Void>?

    init(answers: any HTTPResponder) {
        self.answers = answers
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armDeadline(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        armDeadline(context)
        context.fireChannelActive()
    }

    /// The next request must arrive whole within the request timeout from now; a connection
    /// that sent nothing is closed, one inside a request gets 408.
    private func armDeadline(_ context: ChannelHandlerContext) {
        deadline?.cancel()
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let limit = answers.requestTimeoutMs
        deadline = context.eventLoop.scheduleTask(in: .milliseconds(limit)) {
            let (handler, context) = bound.value
            guard !handler.closing else { return }
            if handler.head == nil && handler.waiting == nil {
                handler.closing = true
                context.close(promise: nil)
            } else {
                handler.respond(context, status: 408, body: Array("the request did not arrive whole within \(limit) ms".utf8), keepAlive: false)
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
            method = request.method.rawValue
            body = []
            refusedEarly = false
            let length = request.headers.first(name: "content-length").flatMap { Int($0) }
            let chunked = request.headers.contains(name: "transfer-encoding")
            if let (status, reply) = answers.refusal(method: request.method.rawValue, target: request.uri,
                                                     authorization: request.headers.first(name: "authorization"),
                                                     contentLength: length, chunked: chunked) {
                refusedEarly = true
                respond(context, status: status, body: reply, keepAlive: false)
            }
        case .body(var buffer):
            guard !refusedEarly else { return }
            guard body.count + buffer.readableBytes <= answers.maxBodyBytes else {
                respond(context, status: 413, body: Array("value larger than \(answers.maxBodyBytes) bytes".utf8), keepAlive: false)
                return
            }
            body.append(contentsOf: buffer.readBytes(length: buffer.readableBytes) ?? [])
        case .end:
            guard let request = head, !refusedEarly else { return }
            head = nil
            let complete = (request, body)
            body = []
            if context.channel.isWritable { answer(context, complete) } else { waiting = complete }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let pending = waiting, !closing {
            waiting = nil
            answer(context, pending)
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        context.fireChannelInactive()
    }

    private func answer(_ context: ChannelHandlerContext, _ request: (HTTPRequestHead, [UInt8])) {
        let (head, body) = request
        let reply = answers.answer(method: head.method.rawValue, target: head.uri, body: body,
                                   authorization: head.headers.first(name: "authorization"))
        respond(context, status: reply.status, body: reply.body, keepAlive: head.isKeepAlive, contentType: reply.contentType)
    }

    private func respond(_ context: ChannelHandlerContext, status: Int, body: [UInt8], keepAlive: Bool, contentType: String = "text/plain") {
        answers.answered(method: method, status: status)
        method = "-"
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(body.count))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        guard keepAlive else {
            closing = true
            deadline?.cancel()
            deadline = nil
            // Closed once the answer is out, or after a grace period if the client does not read it.
            let channel = context.channel
            written.whenComplete { _ in channel.close(promise: nil) }
            context.eventLoop.scheduleTask(in: .milliseconds(Self.closeGraceMs)) { channel.close(promise: nil) }
            return
        }
        armDeadline(context)
    }
}

/// Answers a connection the server will not serve (its address holds too many) with 503 and
/// closes it, once the connection is active.
final class RefusalHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private var refused = false

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { refuse(context) }
    }

    func channelActive(context: ChannelHandlerContext) { refuse(context) }

    private func refuse(_ context: ChannelHandlerContext) {
        guard !refused else { return }
        refused = true
        var busy = context.channel.allocator.buffer(capacity: 128)
        busy.writeString("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\nConnection: close\r\n\r\ntoo many connections")
        let channel = context.channel
        context.writeAndFlush(NIOAny(busy)).whenComplete { _ in channel.close(promise: nil) }
    }
}
