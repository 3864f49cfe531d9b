import Foundation
import TransferEngine

/// The target process `bench --loopback` and `bench-metrics --loopback` measure against.
final class LoopbackTarget {
    let process: Process
    /// Closing it stops the target (`serve --exit-on-stdin-close`).
    let input: Pipe
    /// The target's segment name.
    let segment: String

    private init(process: Process, input: Pipe, segment: String) {
        (self.process, self.input, self.segment) = (process, input, segment)
    }

    /// Stops the target and waits for it.
    func stop() {
        try? input.fileHandleForWriting.close()
        process.terminate()
        process.waitUntilExit()
    }

    /// Starts `transfer-engine serve` (this executable) with a buffer of `bufferSize` at `location`;
    /// the caller stops it.
    static func start(bufferSize: String, location: String, configuration: EngineConfiguration,
                      environment: [String: String]) throws -> LoopbackTarget {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = ["serve", "--exit-on-stdin-close", "--buffer-size", bufferSize, "--location", location,
                             "--local-hostname", configuration.localHostname, "--protocol", configuration.protocolName]
        // The target is another process on this host: it must not take this one's metrics port.
        process.environment = environment.filter { $0.key != "MC_METRICS_PORT" }
        let input = Pipe(), output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        try process.run()
        // Read the READY line (bounded: the target prints it right after binding).
        var line = Data()
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
            if line.contains(UInt8(ascii: "\n")) { break }
        }
        let text = String(decoding: line, as: UTF8.self)
        guard let readyLine = text.split(separator: "\n").first(where: { $0.hasPrefix("READY ") }),
              let segmentField = readyLine.split(separator: " ").first(where: { $0.hasPrefix("segment=") }) else {
            process.terminate()
            throw EngineError.segmentUnavailable(name: "loopback target", reason: "it did not report READY (output: \(text.prefix(200)))")
        }
        return LoopbackTarget(process: process, input: input, segment: String(segmentField.dropFirst("segment=".count)))
    }
}
