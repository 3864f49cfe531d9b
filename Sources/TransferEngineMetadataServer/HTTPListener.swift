import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// An HTTP/1.1 listener on one event-loop thread whose requests a `HTTPResponder` answers, with
/// the connection limits of `ConnectionTable` (per address, in all) and the request deadline of
/// `RequestHandler`. The metadata server and the metrics endpoint are two responders on it.
final class HTTPListener: Sendable {
    private let group: MultiThreadedEventLoopGroup
    private let listener: Channel
    let connections: ConnectionTable
    /// The bound port.
    let port: UInt16

    /// Binds host:port (port 0 = any free port) and starts serving.
    init(host: String, port: UInt16, responder: any HTTPResponder, maxConnections: Int, maxPerAddress: Int, logger: Logger) throws {
        let connections = ConnectionTable(maxConnections: maxConnections, maxPerAddress: maxPerAddress, logger: logger)
        self.connections = connections
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            listener = try ServerBootstrap(group: group)
                .serverChannelOption(ChannelOptions.backlog, value: 1024)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    guard connections.admit(channel) else {
                        return channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(RefusalHandler()) }
                    }
                    return channel.eventLoop.makeCompletedFuture {
                        let pipeline = channel.pipeline.syncOperations
                        try pipeline.configureHTTPServerPipeline(withErrorHandling: true)
                        try pipeline.addHandler(RequestHandler(answers: responder))
                    }
                }
                .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
                .bind(host: host, port: Int(port)).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        self.port = UInt16(listener.localAddress?.port ?? 0)
    }

    /// Stops accepting, closes every connection and ends the event loop.
    func stop() {
        try? listener.close().wait()
        connections.closeAll()
        try? group.syncShutdownGracefully()
    }
}
