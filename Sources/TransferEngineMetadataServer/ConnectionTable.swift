import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The server's open connections: at most `maxPerAddress` from one address (more are refused),
/// and at `maxConnections` the oldest is closed to make room, so idle clients never starve new
/// ones. Refusals are logged at most every 10 s.
final class ConnectionTable: Sendable {
    private struct Entry {
        let channel: Channel
        let address: String
        let order: UInt64
    }
    private struct State {
        var open: [ObjectIdentifier: Entry] = [:]
        var perAddress: [String: Int] = [:]
        var next: UInt64 = 0
        var lastWarning: NIODeadline = .uptimeNanoseconds(0)
    }

    private let state = NIOLockedValueBox(State())
    private let maxConnections: Int
    private let maxPerAddress: Int
    private let logger: Logger

    init(maxConnections: Int, maxPerAddress: Int, logger: Logger) {
        self.maxConnections = max(1, maxConnections)
        self.maxPerAddress = max(1, maxPerAddress)
        self.logger = logger
    }

    /// Whether `channel` may be served; closes the oldest connection when the table is full.
    func admit(_ channel: Channel) -> Bool {
        let address = channel.remoteAddress?.ipAddress ?? "?"
        let id = ObjectIdentifier(channel)
        let (admitted, evicted, warn) = state.withLockedValue { state -> (Bool, Channel?, Bool) in
            guard state.perAddress[address, default: 0] < maxPerAddress else {
                let now = NIODeadline.now()
                let warn = now - state.lastWarning > .seconds(10)
                if warn { state.lastWarning = now }
                return (false, nil, warn)
            }
            var evicted: Channel?
            if state.open.count >= maxConnections, let oldest = state.open.min(by: { $0.value.order < $1.value.order }) {
                evicted = oldest.value.channel
                state.open[oldest.key] = nil
                state.perAddress[oldest.value.address, default: 1] -= 1
                if state.perAddress[oldest.value.address] == 0 { state.perAddress[oldest.value.address] = nil }
            }
            state.open[id] = Entry(channel: channel, address: address, order: state.next)
            state.next += 1
            state.perAddress[address, default: 0] += 1
            return (true, evicted, false)
        }
        if warn { logger.warning("metadata http: \(address) holds \(maxPerAddress) connections already; refusing more from it") }
        evicted?.close(promise: nil)
        if admitted {
            channel.closeFuture.whenComplete { [self] _ in remove(id) }
        }
        return admitted
    }

    private func remove(_ id: ObjectIdentifier) {
        state.withLockedValue { state in
            guard let entry = state.open.removeValue(forKey: id) else { return }
            state.perAddress[entry.address, default: 1] -= 1
            if state.perAddress[entry.address] == 0 { state.perAddress[entry.address] = nil }
        }
    }

    /// Closes every connection (the server stops).
    func closeAll() {
        let channels = state.withLockedValue { $0.open.values.map(\.channel) }
        for channel in channels { try? channel.close().wait() }
    }
}
