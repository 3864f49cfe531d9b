import ArgumentParser
import Foundation
import TransferEngine

/// `route`: which transport requests to a peer's buffers take, and why.
struct RouteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "route",
        abstract: "Show, for each buffer of a peer segment, the transports requests take, in order, and why the others are not used.",
        discussion: """
        Starts an engine with the given settings (the same protocol list as the application),
        opens the segment and prints one block per buffer: the order of transports (the first
        carries requests while it works; the rest are the failover path) and every installed
        transport left out, with the reason. Example:
          MOONCAKE_PROTOCOL=shm,efa transfer-engine route --segment 127.0.0.1:15123
        """
    )

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var engine: EngineOptions

    @Option(help: "The peer segment name (P2P: host:rpc_port).")
    var segment: String

    @Option(help: "Only the buffer holding this address (decimal or 0x hex).")
    var address: String?

    @Option(help: "Route as for a request with this transport_hint.")
    var transportHint: String?

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func run() throws {
        try runReportingErrors {
            let logger = logging.logger()
            let configuration = try engine.resolve(logger: logger)
            var where_: UInt64?
            if let address {
                let text = address.lowercased()
                guard let value = text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text) else {
                    throw ValidationError("--address '\(address)' is not a decimal or 0x hexadecimal address")
                }
                where_ = value
            }
            let transferEngine = try TransferEngine(configuration: configuration, logger: logger)
            defer { transferEngine.shutdown() }
            let handle = try transferEngine.openSegment(segment)
            let reports = try transferEngine.routes(segment: handle, address: where_, hint: transportHint)
            if json {
                let objects: [[String: Any]] = reports.map { report in
                    ["address": report.address, "length": report.length, "location": report.location,
                     "own_protocol": report.ownProtocol ?? NSNull(),
                     "order": report.order.map { ["protocol": $0.protocolName, "why": $0.why] },
                     "skipped": report.skipped.map { ["protocol": $0.protocolName, "why": $0.why] }]
                }
                let body: [String: Any] = ["segment": segment, "installed": transferEngine.activeProtocols, "buffers": objects]
                let data = try JSONSerialization.data(withJSONObject: body, options: [.prettyPrinted, .sortedKeys])
                print(String(decoding: data, as: UTF8.self))
                return
            }
            print("segment \(segment); installed here: \(transferEngine.activeProtocols.joined(separator: ","))")
            if reports.isEmpty { print("(the segment has no registered buffers)") }
            for report in reports {
                let own = report.ownProtocol.map { ", served by \($0)" } ?? ""
                print("buffer 0x\(String(report.address, radix: 16)) length \(report.length) (\(report.location)\(own))")
                if report.order.isEmpty { print("  no transport can carry requests to it") }
                for (rank, entry) in report.order.enumerated() {
                    print("  \(rank == 0 ? "uses" : "then")  \(entry.protocolName): \(entry.why)")
                }
                for entry in report.skipped { print("  not   \(entry.protocolName): \(entry.why)") }
            }
        }
    }
}
