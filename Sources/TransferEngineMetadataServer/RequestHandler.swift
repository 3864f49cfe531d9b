import NIOCore
import NIOHTTP1

/// One connection's requests, after swift-nio's HTTP/1.1 codec: collects a request's body
/// (bounded), answers it, and closes a connection whose request does not arrive whole in time
/// or that stays idle.
final class RequestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let answers: Answers
    private let options: MetadataHTTPServer.Options
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    /// Set once the connection is being closed: its further input is ignored.
    private var closing = false
    private var deadline: Scheduled<Void>?

    init(answers: Answers, options: MetadataHTTPServer.Options) {
        self.answers = answers
        self.options = options
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
            body = []
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let limit = options.requestTimeoutMs
            deadline = context.eventLoop.scheduleTask(in: .milliseconds(limit)) {
                let (handler, context) = bound.value
                handler.respond(context, status: 408, body: Array("the request did not arrive whole within \(limit) ms".utf8), keepAlive: false)
            }
        case .body(var buffer):
            guard body.count + buffer.readableBytes <= options.maxValueBytes else {
                respond(context, status: 413, body: Array("value larger than \(options.maxValueBytes) bytes".utf8), keepAlive: false)
                return
            }
            body.append(contentsOf: buffer.readBytes(length: buffer.readableBytes) ?? [])
        case .end:
            guard let request = head else { return }
            let (status, reply) = answers.answer(method: request.method.rawValue, target: request.uri, body: body,
                                                 authorization: request.headers.first(name: "authorization"))
            head = nil
            body = []
            respond(context, status: status, body: reply, keepAlive: request.isKeepAlive, json: status == 200 && request.method == .GET)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            closing = true
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        context.fireChannelInactive()
    }

    private func respond(_ context: ChannelHandlerContext, status: Int, body: [UInt8], keepAlive: Bool, json: Bool = false) {
        deadline?.cancel()
        deadline = nil
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: json ? "application/json" : "text/plain")
        headers.add(name: "Content-Length", value: String(body.count))
        if !keepAlive {
            headers.add(name: "Connection", value: "close")
            closing = true
        }
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            written.whenComplete { _ in channel.close(promise: nil) }
        }
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
