import Testing
@testable import TransferEngine
@Test func placeholder() { #expect(TCPWire.headerSize == 24) }
