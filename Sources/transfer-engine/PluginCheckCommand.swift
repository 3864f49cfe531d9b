import ArgumentParser
import Foundation
import TransferEngine
import TransferEnginePluginCheck

/// `plugins --check FILE.so`: runs the checks and prints them as a table (or JSON); exits
/// non-zero when one failed. `--check-step vtable` is the child process the checker starts.
struct PluginCheckCommand {
    let file: String
    let protocolName: String?
    let deviceName: String
    let json: Bool
    let step: String?
    let from: Int
    let report: String?

    func run() throws {
        let environment = ProcessInfo.processInfo.environment
        if step == "vtable" {
            // The child: a line before and after each check, written straight to the report file
            // (not stdout, which the plugin shares), so the parent knows where a crash happened.
            let fd = open(report ?? "/dev/null", O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw ValidationError("cannot open the report file \(report ?? "")") }
            defer { close(fd) }
            func put(_ line: String) { _ = (line + "\n").withCString { Glibc.write(fd, $0, strlen($0)) } }
            PluginVtableCheck.run(path: file, protocolName: protocolName, options: { chosen in
                var configuration = EngineConfiguration()
                configuration.deviceName = deviceName
                return TransferEngine.pluginOptions(configuration: configuration, segmentName: "127.0.0.1:1", environment: environment, protocolName: chosen)
            }, from: from, begin: { index in put("BEGIN\t\(index)") }, emit: { index, result in put(result.line(index: index)) },
               chosen: { put("PROTOCOL\t\($0)") })
            return
        }
        guard FileManager.default.fileExists(atPath: file) else { throw ValidationError("\(file): no such file") }
        // Absolute: dlopen of a bare name searches the library path, not this directory.
        let path = URL(fileURLWithPath: file).standardizedFileURL.path
        let checker = PluginChecker(executable: Self.executable, path: path, protocolName: protocolName, deviceName: deviceName, environment: environment)
        if !json { print("checking \(file)\(protocolName.map { " as \($0)" } ?? "")") }
        let results = checker.run { result in
            guard !json else { return }
            print("  \(result.word)  \(result.name)\(result.explanation.isEmpty ? "" : ": \(result.explanation)")")
            fflush(nil)
        }
        let failed = results.filter { if case .failed = $0.outcome { return true } else { return false } }.count
        let skipped = results.filter { if case .skipped = $0.outcome { return true } else { return false } }.count
        if json {
            let objects = results.map { ["check": $0.name, "result": $0.word.lowercased(), "detail": $0.explanation] }
            let document: [String: Any] = ["file": file, "protocol": protocolName ?? "", "passed": results.count - failed - skipped,
                                           "failed": failed, "skipped": skipped, "checks": objects]
            let data = try JSONSerialization.data(withJSONObject: document, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("\(results.count - failed - skipped) passed, \(failed) failed, \(skipped) skipped")
        }
        if failed > 0 { throw ExitCode(1) }
    }

    /// This program's own file (the children run it).
    static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }
}
