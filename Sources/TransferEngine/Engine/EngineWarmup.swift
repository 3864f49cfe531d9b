import Logging

/// What the first-contact rehearsal at start-up did.
struct FirstContactRehearsal: Sendable {
    /// Whether the descriptor fetch and both transfers completed.
    var completed = false
    /// The private servers' ports (closed again when the rehearsal ends).
    var ports: [UInt16] = []
}

extension TransferEngine {
    /// Runs, once, the code a first transfer to a new peer runs. The Swift runtime builds generic
    /// type metadata and resolves conformances the first time each is used, and a conformance
    /// lookup it has not seen scans every conformance record of the process (hundreds of µs in
    /// this binary), which otherwise lands on the first transfer (README, "Performance").
    func warmUpFirstContact() -> FirstContactRehearsal {
        var rehearsal = FirstContactRehearsal()
        var sample = localDescriptor
        sample.buffers.append(.init(name: segmentName, address: 1 << 20, length: 1 << 20))
        let message = HandshakeWire.Message(kind: .metadata, json: sample.json.compactText)
        let framed = message.encoded
        guard framed.count > 8, let body = try? HandshakeWire.decodeBody(Array(framed[8...])),
              let parsed = try? JSONValue.parse(body.json), let decoded = try? SegmentDescriptor.decode(parsed) else { return rehearsal }
        // A TCP link connects on its first request; this one never gets one.
        if let link = try? tcp.connect(segment: segmentName, view: decoded.view(for: tcp.protocolName), host: bindHost) {
            // The segment table's collections, filled as opening a peer fills them.
            var links: [ObjectIdentifier: any TransportPeer] = [:]
            links[ObjectIdentifier(tcp)] = link
            var handles: [String: SegmentHandle] = [:]
            handles[segmentName] = 1
            var peers: [SegmentHandle: Peer] = [:]
            peers[1] = Peer(name: segmentName, host: bindHost, rpcPort: rpcPort, descriptor: decoded, sameHost: true)
            withExtendedLifetime((links, handles, peers)) { link.close() }
        }
        guard settings.rehearseFirstContact else { return rehearsal }
        do {
            try rehearseOnLoopback(message, ports: &rehearsal.ports)
            rehearsal.completed = true
        } catch {
            logger.debug("first-contact rehearsal on loopback did not complete (the first transfer to a peer may take longer): \(error)")
        }
        return rehearsal
    }

    /// One descriptor fetch and one acknowledged 4 KiB write and read, between a private handshake
    /// server, data server and TCP channel on 127.0.0.1: the same code a first contact runs on
    /// both sides (accepting, framing, registry checks, the synchronous path), with none of this
    /// engine's listeners, registrations, notifications or metrics involved; with authentication
    /// configured its connections authenticate as this engine's do. The private handshake server
    /// answers descriptor fetches and probes only (never a plugin, never the notification queue).
    /// Each connect, reply and stop waits at most 1 s; a scratch buffer a connection thread may
    /// still use after that is left allocated rather than freed under it.
    private func rehearseOnLoopback(_ request: HandshakeWire.Message, ports: inout [UInt16]) throws {
        var quiet = logger
        quiet.logLevel = .critical
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 2 * Self.rehearsalBytes, alignment: 4096)
        var threadsEnded = true
        defer { if threadsEnded { scratch.deallocate() } }
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: 2 * Self.rehearsalBytes)
        let local = UInt64(UInt(bitPattern: scratch)), remote = local + UInt64(Self.rehearsalBytes)
        let registry = MemoryRegistry(graceMs: 100)
        try registry.register(address: remote, length: UInt64(Self.rehearsalBytes), location: "cpu:0")
        _ = registry.all(atMost: 64)
        let handshake = try HandshakeServer(listener: try Socket.listen(host: "127.0.0.1", port: 0), maxLength: settings.handshakeMaxLength,
                                            limits: settings.handshakeLimits, auth: authenticator, logger: quiet,
                                            inline: .init(kinds: [.metadata, .probe]) { [weak self] in self?.answerHandshakeInline($0) }) {
            [weak self] message in message.kind == .metadata || message.kind == .probe ? self?.answerHandshake(message) : nil
        }
        defer { handshake.stop(waitMs: 1000) }
        let data = try TCPDataServer(listener: try Socket.listen(host: "127.0.0.1", port: 0), registry: registry, logger: quiet,
                                     payloadTimeoutMs: 1000, spinNanoseconds: settings.serverSpinNs, auth: authenticator)
        ports = [handshake.port, data.port]
        let channel = TCPChannel(host: "127.0.0.1", port: data.port, acknowledged: true,
                                 settings: .init(maxLanes: 1, connectTimeoutMs: 1000, statusTimeoutMs: 1000, laneIdleMs: 1000, auth: authenticator),
                                 logger: quiet)
        // The channel first, so the data server's connection threads see their peer go and end.
        defer {
            channel.close(waitMs: 1000)
            threadsEnded = data.stop(waitMs: 1000)
        }
        let reply = try HandshakeClient.exchange(host: "127.0.0.1", port: handshake.port, message: request,
                                                 timeouts: .init(connectMs: 1000, replyMs: 1000, auth: authenticator))
        _ = try SegmentDescriptor.decode(try JSONValue.parse(reply.json))
        let deadline = MonotonicClock.nanoseconds() + 1_000_000_000
        for operation in [TCPWire.Operation.write, .read] {
            try channel.performInline(operation: operation, localAddress: local, remoteAddress: remote, length: UInt64(Self.rehearsalBytes),
                                      deadline: deadline)
        }
    }

    /// The rehearsal's transfer size (a small synchronous request, as a first contact's usually is).
    private static let rehearsalBytes = 4096
}
