import Testing
@testable import TransferEngine

@Suite("Wire formats")
struct WireTests {
    @Test("TCP header is 24 little-endian bytes with zero padding, as the official engine sends it")
    func headerBytes() {
        let header = TCPWire.Header(size: 0x0102_0304, address: 0x7F00_1122_3344_5566, operation: .write, acknowledged: true)
        let bytes = header.bytes
        #expect(bytes.count == 24)
        #expect(Array(bytes[0..<8]) == [0x04, 0x03, 0x02, 0x01, 0, 0, 0, 0])
        #expect(Array(bytes[8..<16]) == [0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x7F])
        #expect(bytes[16] == 0x81)
        #expect(Array(bytes[17..<24]) == [0, 0, 0, 0, 0, 0, 0])
        let v1Read = TCPWire.Header(size: 1, address: 2, operation: .read, acknowledged: false).bytes
        #expect(v1Read[16] == 0)
    }

    @Test("decoding ignores padding and refuses any opcode but READ and WRITE")
    func headerDecode() {
        var bytes = TCPWire.Header(size: 4096, address: 0xdead_beef, operation: .write, acknowledged: false).bytes
        for i in 17..<24 { bytes[i] = 0xAB }  // upstream sends uninitialised padding
        let decoded = bytes.withUnsafeBytes { TCPWire.Header.decode($0) }
        #expect(decoded == TCPWire.Header(size: 4096, address: 0xdead_beef, operation: .write, acknowledged: false))
        bytes[16] = 0x80
        #expect(bytes.withUnsafeBytes { TCPWire.Header.decode($0) } == TCPWire.Header(size: 4096, address: 0xdead_beef, operation: .read, acknowledged: true))
        for opcode: UInt8 in [2, 0x7F, 0x82, 0x85, 0xFF] {
            bytes[16] = opcode
            #expect(bytes.withUnsafeBytes { TCPWire.Header.decode($0) } == nil, "opcode \(opcode)")
        }
    }

    @Test("v2 status frames carry the MCTV magic in the high half")
    func statusFrames() {
        let ok = TCPWire.statusFrame(.ok)
        let okBytes = withUnsafeBytes(of: ok) { Array($0) }
        #expect(okBytes == [0, 0, 0, 0, 0x56, 0x54, 0x43, 0x4D])
        #expect(TCPWire.decodeStatusFrame(ok) == 0)
        #expect(TCPWire.decodeStatusFrame(TCPWire.statusFrame(.addressRejected)) == 1)
        #expect(TCPWire.decodeStatusFrame(UInt64(0x1234).littleEndian) == nil)
    }

    @Test("handshake frames: host-order length = 1 + JSON, then the type byte")
    func handshakeFrames() throws {
        let message = HandshakeWire.Message(kind: .metadata, json: "{}")
        #expect(message.encoded == [3, 0, 0, 0, 0, 0, 0, 0, 1, 0x7B, 0x7D])
        let decoded = try HandshakeWire.decodeBody(Array(message.encoded.dropFirst(8)))
        #expect(decoded == message)
        let legacy = try HandshakeWire.decodeBody(Array("{\"a\":1}".utf8))
        #expect(legacy.legacy && legacy.kind == .connection)
        #expect(HandshakeWire.Message(kind: .connection, json: "{}", legacy: true).encoded == [2, 0, 0, 0, 0, 0, 0, 0, 0x7B, 0x7D])
        #expect(throws: HandshakeWire.FrameError.emptyMessage) { try HandshakeWire.checkLength(0) }
        #expect(throws: HandshakeWire.FrameError.tooLong(2 << 20, limit: 1 << 20)) { try HandshakeWire.checkLength(2 << 20) }
        // Any first byte above 3 means the legacy (untyped) form, as upstream decides.
        #expect(try HandshakeWire.decodeBody([5, 0x7B]).legacy)
        #expect(throws: HandshakeWire.FrameError.notUTF8) { try HandshakeWire.decodeBody([1, 0xFF, 0xFE]) }
    }

    @Test("segment names and local_hostname parse as upstream")
    func hostPort() throws {
        #expect(try HostPort.parse("10.0.0.1:15123") == HostPort(host: "10.0.0.1", port: 15123))
        #expect(try HostPort.parse("node1") == HostPort(host: "node1", port: nil))
        #expect(try HostPort.parse("[::1]:16000") == HostPort(host: "::1", port: 16000))
        #expect(try HostPort.parse("fe80::1") == HostPort(host: "fe80::1", port: nil))
        #expect(HostPort(host: "::1", port: 5).description == "[::1]:5")
        #expect(throws: EngineError.self) { try HostPort.parse("host:notaport") }
        #expect(throws: EngineError.self) { try HostPort.parse("") }
    }
}
