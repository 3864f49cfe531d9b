import ArgumentParser
import Foundation
import TransferEngine

/// `bench-router`: what choosing a transport costs per request.
struct BenchRouterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-router",
        abstract: "Measure the router's cost per request: planning (route kept), planning with a transport hint, and a full decision.",
        discussion: """
        Starts two engines in this process with the given protocol list (default tcp), registers a
        buffer on each, opens one from the other and times planning a 4 KiB write (nothing is sent).
        Example: MOONCAKE_PROTOCOL=shm,tcp transfer-engine bench-router
        """
    )

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var engine: EngineOptions

    @Option(help: "Requests timed per figure.")
    var iterations: Int = 200_000

    @Option(help: "Also write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        if !(1...10_000_000).contains(iterations) { throw ValidationError("--iterations must be in 1...10000000") }
    }

    func run() throws {
        try runReportingErrors {
            let logger = logging.logger()
            let configuration = try engine.resolve(logger: logger)
            let target = try TransferEngine(configuration: configuration, logger: logger)
            let initiator = try TransferEngine(configuration: configuration, logger: logger)
            defer { target.shutdown(); initiator.shutdown() }
            let remote = try target.allocateManagedBuffer(length: 1 << 20)
            let local = try initiator.allocateManagedBuffer(length: 1 << 20)
            defer { try? target.freeManagedBuffer(address: remote); try? initiator.freeManagedBuffer(address: local) }
            let handle = try initiator.openSegment(target.segmentName)
            let cost = try initiator.measureRouting(segment: handle, localAddress: local, remoteAddress: remote, iterations: iterations)
            let rows = [
                ["plan, route kept", String(format: "%.0f", cost.cachedPlanNs)],
                ["plan, with a transport hint (kept per hint)", String(format: "%.0f", cost.decidedPlanNs)],
                ["router decision alone (\(initiator.activeProtocols.count) transports)", String(format: "%.0f", cost.decisionNs)],
            ]
            print("protocols \(initiator.activeProtocols.joined(separator: ",")); \(cost.iterations) requests per figure")
            print(Table.render(header: ["what", "ns per request"], rows: rows))
            if let json {
                let body: [String: Any] = ["protocols": initiator.activeProtocols, "iterations": cost.iterations,
                                           "cached_plan_ns": cost.cachedPlanNs, "decided_plan_ns": cost.decidedPlanNs,
                                           "decision_ns": cost.decisionNs]
                let data = try JSONSerialization.data(withJSONObject: body, options: [.prettyPrinted, .sortedKeys])
                try data.write(to: URL(fileURLWithPath: json))
            }
        }
    }
}
