#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension TransferEngine {
    /// Tunables read from the environment (upstream's MC_* names where they exist).
    struct Settings: Sendable {
        /// Upstream uses 4; on a 2-core host 2 lanes measured faster (fewer threads contending).
        var lanesPerPeer = min(4, max(2, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        var splitSize: UInt64 = 1 << 20
        var connectTimeoutMs = 5000
        var statusTimeoutMs = 30_000
        var handshakeReplyMs = 60_000
        var handshakeMaxLength = HandshakeWire.defaultMaxLength
        var transferTimeoutNs: UInt64 = 30_000_000_000
        var useV2Client = true
        var portRange: ClosedRange<UInt16> = 15000...17000
        var serverSpinNs: UInt64 = 50_000
        /// The data port closes a connection idle this long (MC_TCP_IDLE_TIMEOUT_SEC).
        var dataIdleTimeoutMs = 300_000
        /// Data connections at once from one address (MC_TCP_MAX_CONNECTIONS_PER_ADDRESS).
        var dataMaxPerAddress = 256
        /// How long a synchronous plugin transfer busy-polls the plugin before it waits (MC_PLUGIN_SYNC_SPIN_US).
        var pluginSyncSpinNs: UInt64 = 50_000
        /// How long freeing a batch waits for its canceled requests to leave the transports, and how long
        /// past its deadline a request waits for them to give it back (MC_FREE_BATCH_WAIT_MS).
        var freeBatchWaitMs = 5000
        /// How long a failed path (transport, peer) is tried last (MC_PATH_COOLDOWN_MS).
        var pathCooldownMs = 5000
        /// A protocol that cannot run is an error instead of a warning (MC_STRICT_PROTOCOL).
        var strictProtocol = false
        /// openSegment fetches the descriptor again each time (upstream's MC_DISABLE_METACACHE).
        var disableMetacache = false
        var metadataTimeoutMs = 5000
        var metadataTTLSeconds = 30
        /// Notifications held until taken (MC_NOTIFY_MAX_COUNT / MC_NOTIFY_MAX_BYTES); the oldest go first.
        var notifyMaxCount = 4096
        var notifyMaxBytes = 64 << 20
        /// Whether start-up rehearses a first contact on private loopback servers (MC_REHEARSE_FIRST_CONTACT=0: no).
        var rehearseFirstContact = true
        /// What handshake-port peers can hold (MC_HANDSHAKE_FRAME_TIMEOUT_MS, _MAX_CONNECTIONS, _MAX_PER_ADDRESS).
        var handshakeLimits = HandshakeServer.Limits()

        init(environment: [String: String]) throws {
            func integer(_ names: [String], _ range: ClosedRange<Int>) throws -> Int? {
                for name in names {
                    guard let text = environment[name], !text.isEmpty else { continue }
                    guard let value = Int(text), range.contains(value) else {
                        throw EngineError.invalidConfiguration("\(name)='\(text)' must be an integer in \(range.lowerBound)...\(range.upperBound)")
                    }
                    return value
                }
                return nil
            }
            if let v = try integer(["MC_TCP_LANES_PER_PEER", "MC_TCP_MAX_CONNECTIONS_PER_PEER"], 1...64) { lanesPerPeer = v }
            if let text = environment["MC_TCP_SPLIT_SIZE"], !text.isEmpty {
                splitSize = max(4096, try ByteSize.parse(text))
            }
            if let v = try integer(["MC_HANDSHAKE_CONNECT_TIMEOUT"], 1...3600) { connectTimeoutMs = v * 1000 }
            if let v = try integer(["MC_TCP_STATUS_TIMEOUT_SEC"], 1...3600) { statusTimeoutMs = v * 1000 }
            if let v = try integer(["MC_HANDSHAKE_MAX_LENGTH"], 1...(128 << 20)) { handshakeMaxLength = v }
            if let v = try integer(["MC_TRANSFER_TIMEOUT"], 1...86_400) { transferTimeoutNs = UInt64(max(5, v)) * 1_000_000_000 }
            useV2Client = environment["MC_TCP_PROTO"] != "1"
            if let v = try integer(["MC_TCP_SERVER_SPIN_US"], 0...10_000) { serverSpinNs = UInt64(v) * 1000 }
            if let v = try integer(["MC_TCP_IDLE_TIMEOUT_SEC"], 1...86_400) { dataIdleTimeoutMs = v * 1000 }
            if let v = try integer(["MC_TCP_MAX_CONNECTIONS_PER_ADDRESS"], 1...TCPDataServer.maxConnections) { dataMaxPerAddress = v }
            if let v = try integer(["MC_PLUGIN_SYNC_SPIN_US"], 0...10_000) { pluginSyncSpinNs = UInt64(v) * 1000 }
            if let v = try integer(["MC_METADATA_TIMEOUT_MS"], 100...600_000) { metadataTimeoutMs = v }
            if let v = try integer(["MC_PATH_COOLDOWN_MS"], 0...3_600_000) { pathCooldownMs = v }
            if let v = try integer(["MC_FREE_BATCH_WAIT_MS"], 0...600_000) { freeBatchWaitMs = v }
            strictProtocol = ProtocolSelector.truthy(environment["MC_STRICT_PROTOCOL"])
            disableMetacache = ProtocolSelector.truthy(environment["MC_DISABLE_METACACHE"])
            if let text = environment["MC_REHEARSE_FIRST_CONTACT"], !text.isEmpty { rehearseFirstContact = ProtocolSelector.truthy(text) }
            if let v = try integer(["MC_METADATA_TTL_SECONDS"], 2...86_400) { metadataTTLSeconds = v }
            if let v = try integer(["MC_HANDSHAKE_FRAME_TIMEOUT_MS"], 100...600_000) { handshakeLimits.frameDeadlineMs = v }
            if let v = try integer(["MC_HANDSHAKE_MAX_CONNECTIONS"], 1...65_536) { handshakeLimits.maxConnections = v }
            if let v = try integer(["MC_HANDSHAKE_MAX_PER_ADDRESS"], 1...65_536) { handshakeLimits.maxPerAddress = v }
            if let v = try integer(["MC_NOTIFY_MAX_COUNT"], 1...1_000_000) { notifyMaxCount = v }
            if let v = try integer(["MC_NOTIFY_MAX_BYTES"], 1024...(1 << 34)) { notifyMaxBytes = v }
            let low = try integer(["MC_MIN_RPC_PORT", "MC_MIN_PRC_PORT"], 1...65535) ?? 15000
            let high = try integer(["MC_MAX_RPC_PORT", "MC_MAX_PRC_PORT"], 1...65535) ?? 17000
            guard low <= high else { throw EngineError.invalidConfiguration("MC_MIN_RPC_PORT \(low) is above MC_MAX_RPC_PORT \(high)") }
            portRange = UInt16(low)...UInt16(high)
        }
    }
}
