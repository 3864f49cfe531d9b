import Logging

/// The built-in TCP transport: the data server (which serves this engine's registered memory
/// from the shared registry) on one side, one `TCPChannel` per peer on the other. Always
/// installed, always the last resort.
final class TCPTransport: Transport, @unchecked Sendable {
    let protocolName = "tcp"
    let movesDeviceMemory = false
    let splitsRequests = false

    private let channelSettings: TCPChannel.Settings
    /// Whether requests use the acknowledged (v2) framing when the peer offers it (MC_TCP_PROTO).
    private let useV2: Bool
    /// Requests up to this size run on the caller's thread; larger ones spread over lanes.
    private let inlineLimit: UInt64
    private let logger: Logger

    init(channelSettings: TCPChannel.Settings, useV2: Bool, inlineLimit: UInt64, logger: Logger) {
        self.channelSettings = channelSettings
        self.useV2 = useV2
        self.inlineLimit = inlineLimit
        self.logger = logger
    }

    // The data server reads the engine's registry: nothing to register here.
    func register(address: UInt64, length: UInt64, location: String) throws -> [String: JSONValue] { [:] }
    func unregister(address: UInt64) throws {}
    func allocate(length: UInt64, location: String) throws -> UInt64? { nil }
    func free(address: UInt64) throws {}
    func localDescriptorFragment() throws -> [String: JSONValue] { [:] }

    func connect(segment: String, view: SegmentDescriptor, host: String) throws -> any TransportPeer {
        guard view.tcpDataPort != 0 else {
            throw EngineError.segmentUnavailable(name: segment, reason: "it publishes no TCP data port")
        }
        let channel = TCPChannel(host: host, port: view.tcpDataPort, acknowledged: useV2 && view.tcpProtocolVersion >= 2,
                                 settings: channelSettings, logger: logger)
        return TCPPeer(channel: channel, segment: segment, inlineLimit: inlineLimit)
    }

    /// A TCP-only engine answers a connection handshake with an empty one, as upstream does.
    func handleHandshake(_ request: String) -> String? {
        #"{"local_gid":"","local_lid":0,"local_nic_path":"","peer_nic_path":"","qp_num":[],"reply_msg":""}"#
    }

    func shutdown() {}
}

/// A TCP channel seen as a transport peer.
final class TCPPeer: TransportPeer, @unchecked Sendable {
    let channel: TCPChannel
    private let segment: String
    private let inlineLimit: UInt64

    init(channel: TCPChannel, segment: String, inlineLimit: UInt64) {
        self.channel = channel
        self.segment = segment
        self.inlineLimit = inlineLimit
    }

    func submit(_ slices: [TransferSlice]) { channel.enqueue(slices) }

    func transferSync(_ operation: TransferRequest.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64,
                      deadline: UInt64) -> SyncOutcome? {
        guard length <= inlineLimit else { return nil }
        do {
            try channel.performInline(operation: operation == .read ? .read : .write, localAddress: localAddress,
                                      remoteAddress: remoteAddress, length: length, deadline: deadline)
            return .completed
        } catch is DeadlinePassed {
            return .timedOut
        } catch {
            let text = "\(operation) of \(length) bytes to \(segment): \(error)"
            return TransferRejection.isRequestRefusal(error) ? .rejected(text) : .failed(text)
        }
    }

    func close() { channel.close() }
}
