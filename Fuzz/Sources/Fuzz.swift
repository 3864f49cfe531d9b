// libFuzzer harnesses for everything that decodes bytes from a peer, a descriptor or a metadata
// server. One binary, the target chosen by TE_FUZZ_TARGET (scripts/fuzz.sh runs each in turn);
// built only with TE_FUZZ=1 and -sanitize=fuzzer,address (see Package.swift and scripts/fuzz.sh).
import Foundation
import GPUPlugin
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
            _ = HTTPWire.queryValue("key", in: message.startLine.dropFirst().first ?? "")
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
    case "gpu-descriptor":
        if let peer = try? PeerSegment(json: String(decoding: array, as: UTF8.self)) {
            _ = peer.buffer(containing: UInt64(count) << 16, length: UInt64(count))
        }
    default:
        fatalError("TE_FUZZ_TARGET must name a harness (json, descriptor, handshake, http, resp, tcp-header, segment-name, gpu-descriptor)")
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
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector) { fuzzOneInput($0, $1) }
}
