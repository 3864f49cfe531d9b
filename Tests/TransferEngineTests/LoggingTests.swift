import Foundation
import Logging
import Testing
@testable import TransferEngine

/// Log settings (flags over MC_LOG_LEVEL / MC_LOG_FORMAT), the JSON line format, and the CLI's
/// --log-level / --log-format on a real `serve`.
@Suite("Logging: levels, formats, JSON lines")
struct LoggingTests {
    @Test("a flag wins over the environment, the environment over the default; unknown names are refused naming the choices")
    func resolve() throws {
        let environment = ["MC_LOG_LEVEL": "ERROR", "MC_LOG_FORMAT": "json"]
        #expect(try LogSettings.resolve(environment: [:], defaultLevel: .warning) == LogSettings(level: .warning, format: .text))
        #expect(try LogSettings.resolve(environment: environment, defaultLevel: .info) == LogSettings(level: .error, format: .json))
        #expect(try LogSettings.resolve(level: "debug", format: "TEXT", environment: environment, defaultLevel: .info) == LogSettings(level: .debug, format: .text))
        #expect(try LogSettings.resolve(environment: ["MC_LOG_LEVEL": "warn", "MC_LOG_FORMAT": ""], defaultLevel: .info).level == .warning)
        for (level, format) in [("loud", nil), (nil, "xml")] as [(String?, String?)] {
            do {
                _ = try LogSettings.resolve(level: level, format: format, environment: [:], defaultLevel: .info)
                Issue.record("\(level ?? "") \(format ?? "") should be refused")
            } catch let error as EngineError {
                #expect(error.description.contains(level == nil ? "is not text or json" : "is not one of trace, debug, info"), "\(error)")
            }
        }
        #expect(throws: EngineError.self) { try LogSettings.resolve(environment: ["MC_LOG_LEVEL": "verbose"], defaultLevel: .info) }
    }

    @Test("a JSON line is one object: time, level, label, thread, tid, source, message, then metadata; text is escaped")
    func jsonLine() throws {
        let line = JSONLogHandler.line(time: "2026-12-06T16:38:47.000001Z", level: .warning, label: "transfer-engine", thread: "te-data",
                                       tid: 42, source: "TransferEngine", message: "a \"quoted\"\nline\t\u{1}",
                                       metadata: ["peer": "127.0.0.1:1234", "level": "spoofed"])
        #expect(!line.contains("\n"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["level"] as? String == "warning" && object["thread"] as? String == "te-data" && object["tid"] as? Int == 42)
        #expect(object["message"] as? String == "a \"quoted\"\nline\t\u{1}" && object["peer"] as? String == "127.0.0.1:1234")
        #expect(line.hasPrefix(#"{"time":"2026-12-06T16:38:47.000001Z","level":"warning","label":"transfer-engine","thread":"te-data""#), "\(line)")
        #expect(JSONLogHandler.now().count == "2026-12-06T16:38:47.000001Z".count)
    }

    @Test("serve --log-format json --log-level debug writes JSON lines; MC_LOG_LEVEL=error keeps info quiet; a bad level is a usage error")
    func cli() throws {
        let (status, _, stderr) = try TestSupport.run(TestSupport.cli, ["serve", "--exit-on-stdin-close", "--local-hostname", "127.0.0.1",
                                                                      "--buffer-size", "1MiB", "--log-format", "json", "--log-level", "debug"],
                                                      environment: TestSupport.cleanEnvironment(), timeout: 60)
        #expect(status == 0, "\(stderr.suffix(500))")
        let lines = stderr.split(separator: "\n").filter { $0.hasPrefix("{") }
        #expect(!lines.isEmpty, "\(stderr.suffix(500))")
        var levels: Set<String> = []
        for line in lines {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line)")
            levels.insert(object["level"] as? String ?? "")
            #expect(object["time"] is String && object["thread"] is String && object["tid"] is Int && object["message"] is String)
        }
        #expect(levels.contains("info") && lines.contains { $0.contains("engine ready") }, "\(levels)")

        let (_, _, quiet) = try TestSupport.run(TestSupport.cli, ["serve", "--exit-on-stdin-close", "--local-hostname", "127.0.0.1", "--buffer-size", "1MiB"],
                                                environment: TestSupport.cleanEnvironment(["MC_LOG_LEVEL": "error"]), timeout: 60)
        #expect(!quiet.contains("engine ready"), "\(quiet.suffix(300))")

        let (bad, _, message) = try TestSupport.run(TestSupport.cli, ["plugins", "--log-level", "loud"], environment: TestSupport.cleanEnvironment(), timeout: 60)
        #expect(bad != 0 && message.contains("log level 'loud' (--log-level) is not one of"), "\(message)")
        // From the environment (perhaps set for another engine) it is one warning, not a failure.
        let (fine, _, warning) = try TestSupport.run(TestSupport.cli, ["plugins"], environment: TestSupport.cleanEnvironment(["MC_LOG_LEVEL": "loud"]), timeout: 60)
        #expect(fine == 0 && warning.contains("log level 'loud' (MC_LOG_LEVEL) is not one of") && warning.contains("ignored"), "\(warning)")
    }
}
