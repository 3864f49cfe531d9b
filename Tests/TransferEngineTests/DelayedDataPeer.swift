import Foundation
import Logging
@testable import TransferEngine

/// A peer whose TCP data port answers reads slowly: the status frame and the first half of the
/// data at once, the second half `delay` later (a congested or stalling peer). Its handshake
/// port answers metadata requests with a descriptor naming that data port and one buffer, so an
/// engine opens it as `segment` (P2PHANDSHAKE). The first half is 0x11 bytes, the late half 0x22.
/// With `readsWrites` false it stops reading at a write's header instead (a peer that stalls
/// mid-request), and closes the connection `delay` later.
final class DelayedDataPeer: @unchecked Sendable {
    static let bufferAddress: UInt64 = 0x1000_0000
    static let bufferLength: UInt64 = 64 << 20

    let segment: String
    private let data: Socket
    private let handshake: HandshakeServer
    private let delay: TimeInterval
    private let readsWrites: Bool

    init(delay: TimeInterval, readsWrites: Bool = true) throws {
        self.delay = delay
        self.readsWrites = readsWrites
        data = try Socket.listen(host: "127.0.0.1", port: 0)
        let rpc = try Socket.listen(host: "127.0.0.1", port: 0)
        let name = "127.0.0.1:\(rpc.localAddress.port)"
        segment = name
        let descriptor = #"{"name":"\#(name)","protocol":"tcp","tcp_data_port":\#(data.localAddress.port),"tcp_proto_version":2,"#
            + #""buffers":[{"name":"\#(name)","addr":\#(Self.bufferAddress),"length":\#(Self.bufferLength)}]}"#
        handshake = try HandshakeServer(listener: rpc, maxLength: 1 << 20, logger: Logger(label: "delayed-peer")) { message in
            switch message.kind {
            case .metadata: return descriptor
            case .probe: return #"{"status":"success"}"#
            default: return nil
            }
        }
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    private func acceptLoop() {
        while let connection = try? data.accept() {
            Thread.detachNewThread { [self] in serve(connection) }
        }
        data.close()  // here, not in stop(): closing under a thread blocked in accept races with it
    }

    /// Answers reads (half now, half after `delay`) and writes (status after `delay`) until the
    /// connection ends.
    private func serve(_ connection: Socket) {
        defer { connection.close() }
        var header = [UInt8](repeating: 0, count: TCPWire.headerSize)
        while (try? header.withUnsafeMutableBytes { try connection.receiveAll($0.baseAddress!, count: $0.count) }) != nil {
            guard let request = header.withUnsafeBytes({ TCPWire.Header.decode($0) }) else { return }
            let size = Int(request.size)
            var ok = TCPWire.statusFrame(.ok)
            if request.operation == .read {
                let first = [UInt8](repeating: 0x11, count: size / 2), late = [UInt8](repeating: 0x22, count: size - size / 2)
                guard (try? withUnsafeBytes(of: &ok) { try connection.sendAll([$0, first.withUnsafeBytes { $0 }]) }) != nil else { return }
                Thread.sleep(forTimeInterval: delay)
                guard (try? late.withUnsafeBytes { try connection.sendAll([$0]) }) != nil else { return }
            } else if !readsWrites {
                Thread.sleep(forTimeInterval: delay)
                return
            } else {
                var payload = [UInt8](repeating: 0, count: size)
                guard (try? payload.withUnsafeMutableBytes { try connection.receiveAll($0.baseAddress!, count: size) }) != nil else { return }
                Thread.sleep(forTimeInterval: delay)
                guard (try? withUnsafeBytes(of: &ok) { try connection.sendAll([$0]) }) != nil else { return }
            }
        }
    }

    func stop() {
        handshake.stop()
        data.shutdownBoth()  // wakes the accept loop, which closes the listener
    }
}
