import Testing
@testable import TransferEngine

@Suite("Segment descriptors")
struct DescriptorTests {
    @Test("addresses above 2^53 survive a JSON round trip exactly")
    func exactAddresses() throws {
        let descriptor = SegmentDescriptor(name: "127.0.0.1:15123", protocolName: "tcp", tcpDataPort: 16042, timestamp: "t",
                                           buffers: [.init(name: "127.0.0.1:15123", address: 0x7FFF_FFFF_FFFF_F001, length: 1 << 30)])
        let text = descriptor.json.compactText
        #expect(text.contains("\"addr\":9223372036854771713"))
        #expect(text.contains("\"tcp_proto_version\":2"))
        let decoded = try SegmentDescriptor.decode(try JSONValue.parse(text))
        #expect(decoded == descriptor)
    }

    @Test("decodes an official engine's descriptor, keeping unknown keys")
    func officialShape() throws {
        let json = """
        {"buffers":[{"addr":140123456789504,"length":1073741824,"name":"10.0.0.1:15123"}],"name":"10.0.0.1:15123",
         "protocol":"tcp","tcp_data_port":16042,"tcp_proto_version":2,"timestamp":"2026-11-26 01:02:03.123456","rdma_server_name":"x"}
        """
        let descriptor = try SegmentDescriptor.decode(try JSONValue.parse(json))
        #expect(descriptor.tcpDataPort == 16042 && descriptor.buffers[0].address == 140_123_456_789_504)
        #expect(descriptor.extra["rdma_server_name"] == .string("x"))
        // An older engine omits tcp_proto_version: that means v1 framing.
        let old = try SegmentDescriptor.decode(try JSONValue.parse(#"{"protocol":"tcp","tcp_data_port":1,"buffers":[]}"#))
        #expect(old.tcpProtocolVersion == 1)
    }

    @Test("rejects descriptors the official decoder rejects")
    func strict() {
        for bad in [#"{"name":"x"}"#, #"{"protocol":"tcp","buffers":[{"name":"","addr":1,"length":1}]}"#,
                    #"{"protocol":"tcp","buffers":[{"name":"a","addr":0,"length":1}]}"#,
                    #"{"protocol":"tcp","buffers":[{"name":"a","addr":18446744073709551615,"length":2}]}"#,
                    #"{"protocol":"tcp","tcp_data_port":70000}"#, "[1]"] {
            #expect(throws: (any Error).self, "\(bad)") { try SegmentDescriptor.decode(try JSONValue.parse(bad)) }
        }
    }

    @Test("range containment is overflow-safe")
    func contains() {
        let buffer = SegmentDescriptor.Buffer(name: "b", address: 1000, length: 100)
        #expect(buffer.contains(address: 1000, length: 100))
        #expect(buffer.contains(address: 1099, length: 1))
        #expect(!buffer.contains(address: 1099, length: 2))
        #expect(!buffer.contains(address: 999, length: 1))
        #expect(!buffer.contains(address: 1050, length: UInt64.max))
        #expect(!buffer.contains(address: 1000, length: 0))
    }

    @Test("the local registry refuses overlap and finds ranges")
    func registry() throws {
        let registry = MemoryRegistry()
        try registry.register(address: 0x1000, length: 0x1000, location: "cpu:0")
        try registry.register(address: 0x3000, length: 0x1000, location: "cpu:0")
        #expect(throws: EngineError.self) { try registry.register(address: 0x1800, length: 0x1000, location: "*") }
        #expect(throws: EngineError.self) { try registry.register(address: 0x2800, length: 0x1000, location: "*") }
        #expect(throws: EngineError.self) { try registry.register(address: UInt64.max - 5, length: 10, location: "*") }
        #expect(registry.region(containing: 0x1FFF, length: 1) != nil)
        #expect(registry.region(containing: 0x1FFF, length: 2) == nil)  // spans two regions: refused
        #expect(registry.region(containing: 0x2000, length: 1) == nil)
        try registry.unregister(address: 0x1000)
        #expect(registry.region(containing: 0x1000, length: 1) == nil)
        #expect(throws: EngineError.self) { try registry.unregister(address: 0x1000) }
    }

    @Test("a TCP-only engine's kept descriptor text follows every registration and unregistration; past 64 buffers the inline answer declines")
    func keptText() throws {
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { engine.shutdown() }
        func listed() throws -> [UInt64] {
            let text = engine.localDescriptorText
            #expect(engine.inlineDescriptorText(maxBuffers: 64) == text)
            return try SegmentDescriptor.decode(try JSONValue.parse(text)).buffers.map(\.address)
        }
        let buffers = (0..<66).map { _ in TestBuffer(4096) }
        #expect(try listed().isEmpty)
        try engine.registerMemory(address: buffers[0].address, length: 4096)
        // Built by the registration, before any fetch.
        #expect(engine.state.withLock { $0.descriptorText?.buffers } == 1)
        #expect(try listed() == [buffers[0].address])
        try engine.registerMemory(address: buffers[1].address, length: 4096)
        #expect(Set(try listed()) == [buffers[0].address, buffers[1].address])
        try engine.unregisterMemory(address: buffers[0].address)
        #expect(try listed() == [buffers[1].address])
        for buffer in buffers[2...] { try engine.registerMemory(address: buffer.address, length: 4096) }
        let all = try SegmentDescriptor.decode(try JSONValue.parse(engine.localDescriptorText)).buffers.map(\.address)
        #expect(Set(all) == Set(buffers[1...].map(\.address)))
        #expect(engine.inlineDescriptorText(maxBuffers: 64) == nil)
        try engine.unregisterMemory(address: buffers[1].address)
        #expect(Set(try listed()) == Set(buffers[2...].map(\.address)))
    }

    @Test("shutdown drops the kept descriptor text with the managed buffers it frees")
    func keptTextAfterShutdown() throws {
        let engine = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        let address = try engine.allocateManagedBuffer(length: 1 << 20)
        #expect(try SegmentDescriptor.decode(try JSONValue.parse(engine.localDescriptorText)).buffers.map(\.address) == [address])
        engine.shutdown()
        #expect(try SegmentDescriptor.decode(try JSONValue.parse(engine.localDescriptorText)).buffers.isEmpty)
    }

}


@Suite("JSON")
struct JSONTests {
    @Test("parses and prints with exact integers, escapes and sorted keys")
    func roundTrip() throws {
        let text = #"{"z":[1,-2,18446744073709551615,1.5,true,false,null],"a":"q\"\\\/\n\u00e9\ud83d\ude00","m":{}}"#
        let value = try JSONValue.parse(text)
        #expect(value["z"]?.arrayValue?[2] == .uint(UInt64.max))
        #expect(value["z"]?.arrayValue?[1] == .int(-2))
        #expect(value["a"]?.stringValue == "q\"\\/\né😀")
        let printed = value.compactText
        #expect(printed.hasPrefix(#"{"a":"#) && printed.hasSuffix(#""m":{},"z":[1,-2,18446744073709551615,1.5,true,false,null]}"#))
        #expect(try JSONValue.parse(printed) == value)
    }

    @Test("errors carry line and column")
    func errors() {
        let cases: [(String, String)] = [
            ("{\n  \"a\": ,\n}", "line 2, column 8"), ("[1,2", "end of input"), ("{\"a\" 1}", "expected ':'"),
            ("01", "leading zero"), ("\"\\x\"", "invalid escape"), ("[1] x", "unexpected text"), ("", "end of input"),
            ("\"\\ud800\"", "unpaired surrogate"), (String(repeating: "[", count: 300), "nesting"),
        ]
        for (text, expected) in cases {
            do {
                _ = try JSONValue.parse(text)
                Issue.record("accepted \(text)")
            } catch {
                #expect("\(error)".contains(expected), "\(text): \(error)")
            }
        }
    }
}
