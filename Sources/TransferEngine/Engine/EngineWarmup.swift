extension TransferEngine {
    /// Runs, once and without I/O, the code a first transfer to a new peer runs: describing this
    /// segment, framing and parsing a handshake, reading a peer's descriptor, and setting up a TCP
    /// link. The Swift runtime builds generic type metadata and resolves conformances the first
    /// time each is used, which otherwise lands on the first transfer (README, "Performance").
    func warmUpFirstContact() {
        var sample = localDescriptor
        sample.buffers.append(.init(name: segmentName, address: 1 << 20, length: 1 << 20))
        let message = HandshakeWire.Message(kind: .metadata, json: sample.json.compactText)
        let framed = message.encoded
        guard framed.count > 8, let body = try? HandshakeWire.decodeBody(Array(framed[8...])),
              let parsed = try? JSONValue.parse(body.json), let decoded = try? SegmentDescriptor.decode(parsed) else { return }
        // A TCP link connects on its first request; this one never gets one.
        if let link = try? tcp.connect(segment: segmentName, view: decoded.view(for: tcp.protocolName), host: bindHost) { link.close() }
    }
}
