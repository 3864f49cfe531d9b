import Logging

/// Measurements for `transfer-engine bench-metadata`: how long a first transfer
/// to a new peer takes through each metadata backend, and how many requests per
/// second an HTTP metadata server answers under concurrent clients.
public enum MetadataBenchmark {
    /// One backend's figures.
    public struct OpenLatency: Sendable {
        /// The metadata_server string used.
        public var metadataServer: String
        /// Median time (µs) from openSegment to the end of a first 4 KiB write, over fresh initiators.
        public var medianMicros: Double
        /// Every sample (µs).
        public var samples: [Double]
    }

    /// Starts a target engine on `metadataServer` and, `rounds` times, a fresh initiator that
    /// opens the target and writes 4 KiB; returns the median of those first operations.
    public static func openLatency(metadataServer: String, rounds: Int, environment: [String: String]) throws -> OpenLatency {
        var environment = environment
        if environment["MC_TCP_BIND_ADDRESS"] == nil { environment["MC_TCP_BIND_ADDRESS"] = "127.0.0.1" }
        let quiet = Logger(label: "bench") { _ in SwiftLogNoOpLogHandler() }
        let p2p = metadataServer == "P2PHANDSHAKE"
        let tag = UInt16.random(in: 20000...60000)
        let target = try TransferEngine(configuration: EngineConfiguration(localHostname: p2p ? "127.0.0.1" : "127.0.0.1:\(tag)", metadataServer: metadataServer),
                                        environment: environment, logger: quiet)
        defer { target.shutdown() }
        let remote = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { remote.deallocate() }
        try target.registerMemory(address: UInt64(UInt(bitPattern: remote)), length: 1 << 20)
        var samples: [Double] = []
        for round in 0..<max(1, rounds) {
            let initiator = try TransferEngine(configuration: EngineConfiguration(localHostname: p2p ? "127.0.0.1" : "127.0.0.1:\(tag &+ UInt16(round + 1))",
                                                                                  metadataServer: metadataServer),
                                               environment: environment, logger: quiet)
            defer { initiator.shutdown() }
            let local = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { local.deallocate() }
            try initiator.registerMemory(address: UInt64(UInt(bitPattern: local)), length: 4096)
            let start = MonotonicClock.nanoseconds()
            let handle = try initiator.openSegment(target.segmentName)
            try initiator.transferSync(.write, localAddress: UInt64(UInt(bitPattern: local)), segment: handle,
                                       remoteAddress: UInt64(UInt(bitPattern: remote)), length: 4096)
            samples.append(Double(MonotonicClock.nanoseconds() - start) / 1000)
        }
        let sorted = samples.sorted()
        return OpenLatency(metadataServer: metadataServer, medianMicros: sorted[sorted.count / 2], samples: samples)
    }

    /// Load figures for an HTTP metadata server.
    public struct HTTPLoad: Sendable {
        /// Requests answered (PUT and GET, each a fresh connection as the official client uses).
        public var requests: Int
        /// Requests that failed.
        public var failures: Int
        /// Wall time in seconds.
        public var seconds: Double
        /// Median request latency in µs.
        public var medianMicros: Double
        /// Requests per second.
        public var requestsPerSecond: Double { Double(requests) / seconds }
    }

    /// `clients` threads alternate PUT and GET of their own keys against `url` for `seconds`
    /// (at most `maxRequestsPerClient` each).
    public static func httpLoad(url: String, clients: Int, seconds: Double, maxRequestsPerClient: Int = 1_000_000) throws -> HTTPLoad {
        let store = try HTTPMetadataStore(url: url, timeoutMs: 5000)
        let results = ConditionLock<(requests: Int, failures: Int, latencies: [UInt64], done: Int)>((0, 0, [], 0))
        let start = MonotonicClock.nanoseconds()
        let end = start + UInt64(seconds * 1e9)
        for client in 0..<max(1, clients) {
            try OSThread.spawn(name: "te-meta-load") {
                var requests = 0, failures = 0
                var latencies: [UInt64] = []
                while MonotonicClock.nanoseconds() < end, requests < maxRequestsPerClient {
                    let key = "mooncake/ram/bench-\(client)-\(requests % 1000)"
                    let t0 = MonotonicClock.nanoseconds()
                    do {
                        if requests % 2 == 0 { try store.put(key, #"{"bench":true}"#, ttlSeconds: nil) } else { _ = try store.get(key) }
                    } catch { failures += 1 }
                    latencies.append(MonotonicClock.nanoseconds() - t0)
                    requests += 1
                }
                results.withLock(notify: true) { state in
                    state.requests += requests
                    state.failures += failures
                    state.latencies += latencies
                    state.done += 1
                }
            }
        }
        _ = results.wait(deadline: end + 30_000_000_000) { $0.done == max(1, clients) ? true : nil }
        let elapsed = Double(MonotonicClock.nanoseconds() - start) / 1e9
        return results.withLock { state in
            let sorted = state.latencies.sorted()
            return HTTPLoad(requests: state.requests, failures: state.failures, seconds: elapsed,
                            medianMicros: sorted.isEmpty ? 0 : Double(sorted[sorted.count / 2]) / 1000)
        }
    }
}
