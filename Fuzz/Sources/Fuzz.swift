// libFuzzer harnesses for everything that decodes bytes from a peer, a descriptor or a metadata
// server. One binary, the target chosen by TE_FUZZ_TARGET (scripts/fuzz.sh runs each in turn);
// built only with TE_FUZZ=1 and -sanitize=fuzzer,address (see Package.swift and scripts/fuzz.sh).
import Foundation
import GPUPlugin
import Logging
@testable import TransferEngine

#if canImport(Glibc)
import Glibc
#endif

/// The harness TE_FUZZ_TARGET names, read once.
private let target: String = ProcessInfo.processInfo.environment["TE_FUZZ_TARGET"] ?? ""

/// A connected socket pair whose one end already holds `data` and is closed: readers that take a
/// Socket see exactly these bytes, then EOF.
private func socketHolding(_ data: UnsafeRawBufferPointer) -> Socket? {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return nil }
    var size: Int32 = 4 << 20
    setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    if data.count > 0 { _ = send(fds[1], data.baseAddress, data.count, Int32(MSG_NOSIGNAL)) }
    close(fds[1])
    let socket = Socket(descriptor: .init(rawValue: fds[0]))
    socket.setTimeouts(receiveMs: 100, sendMs: 100)
    return socket
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>, _ count: Int) -> Int32 {
    let data = UnsafeRawBufferPointer(start: bytes, count: count)
    let array = Array(data)
    switch target {
    case "json":
        _ = try? JSONValue.parse(array)
    case "descriptor":
        if let value = try? JSONValue.parse(array), let descriptor = try? SegmentDescriptor.decode(value) {
            _ = descriptor.json.compactText
            _ = descriptor.buffer(containing: UInt64(count) << 12, length: UInt64(count))
        }
    case "handshake":
        if count >= 8 {
            let length = data.loadUnaligned(as: UInt64.self)
            _ = try? HandshakeWire.checkLength(length, limit: 1 << 20)
            _ = try? HandshakeWire.decodeBody(Array(array[8...]))
        }
    case "http":
        guard let socket = socketHolding(data) else { return 0 }
        var buffered: [UInt8] = []
        while let message = try? HTTPWire.read(from: socket, buffered: &buffered) {
            _ = message.headers["content-type"]
        }
    case "resp":
        guard let socket = socketHolding(data) else { return 0 }
        var reader = RedisMetadataStore.LineReader(socket: socket)
        while (try? reader.reply()) != nil {}
    case "tcp-header":
        if count >= TCPWire.headerSize { _ = TCPWire.Header.decode(data) }
        for offset in stride(from: 0, to: count, by: 8) where offset + 8 <= count {
            _ = TCPWire.decodeStatusFrame(data.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        }
    case "segment-name":
        _ = try? HostPort.parse(String(decoding: array, as: UTF8.self))
        _ = try? MetadataServer.parse(String(decoding: array, as: UTF8.self))
        _ = try? ByteSize.parse(String(decoding: array, as: UTF8.self))
    case "data-server":
        DataServerHarness.shared.run(data)
    case let name where name.hasPrefix("plugin-"):
        if case .success(let harness) = PluginHarness.shared { harness.run(data) }
    case "gpu-descriptor":
        if let peer = try? PeerSegment(json: String(decoding: array, as: UTF8.self)) {
            _ = peer.buffer(containing: UInt64(count) << 16, length: UInt64(count))
        }
    default:
        fatalError("TE_FUZZ_TARGET must name a harness (json, descriptor, handshake, http, resp, tcp-header, data-server, segment-name, gpu-descriptor, plugin-<protocol>)")
    }
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>,
                                 _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                                 _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> Int32) -> Int32

/// The entry SwiftPM links an executable target's `main` to: hands the command line to libFuzzer.
@_cdecl("te_fuzz_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    if target.hasPrefix("plugin-"), case .failure(let unavailable) = PluginHarness.shared {
        print("SKIPPED: \(target): \(unavailable.reason)")
        return 0
    }
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector) { fuzzOneInput($0, $1) }
}

/// A real TCP data server over a registered 1 MiB buffer. Each input is one connection's bytes;
/// when its first byte is odd, the address of every 24-byte header is moved into the buffer
/// (offset = address mod buffer size), so the fuzzer reaches the serving paths, not only refusals.
final class DataServerHarness: @unchecked Sendable {
    static let shared = DataServerHarness()
    let registry = MemoryRegistry(graceMs: 100)
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    let server: TCPDataServer

    init() {
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5A, count: 1 << 20)
        try! registry.register(address: UInt64(UInt(bitPattern: buffer)), length: 1 << 20, location: "cpu:0")
        var logger = Logger(label: "fuzz")
        logger.logLevel = .critical
        server = try! TCPDataServer(listener: try! Socket.listen(host: "127.0.0.1", port: 0), registry: registry, logger: logger,
                                    payloadTimeoutMs: 200, spinNanoseconds: 0, idleTimeoutMs: 200)
    }

    func run(_ data: UnsafeRawBufferPointer) {
        var bytes = Array(data)
        if let first = bytes.first, first & 1 == 1 {
            let base = UInt64(UInt(bitPattern: buffer))
            var offset = 1
            while offset + TCPWire.headerSize <= bytes.count {
                let address = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self) }
                let moved = base + address % (1 << 20)
                withUnsafeBytes(of: moved.littleEndian) { for i in 0..<8 { bytes[offset + 8 + i] = $0[i] } }
                offset += TCPWire.headerSize
            }
        }
        guard let socket = try? Socket.connect(host: "127.0.0.1", port: server.port, timeoutMs: 1000) else { return }
        defer { socket.close() }
        socket.setTimeouts(receiveMs: 300, sendMs: 300)
        _ = try? bytes.withUnsafeBytes { try socket.sendAll([$0]) }
        socket.shutdownWrite()
        var sink = [UInt8](repeating: 0, count: 64 << 10)
        while let n = try? sink.withUnsafeMutableBytes({ try socket.receiveSome($0.baseAddress!, count: $0.count) }), n > 0 {}
    }
}
