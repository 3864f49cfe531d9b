import Foundation
import TransferEngine

/// `transfer-engine plugins --check FILE.so`: the conformance battery a plugin author runs. The
/// vtable checks run in child processes of `executable` (a crash fails the check that crashed,
/// and the rest go on in a fresh child); the engine checks run two engines in two processes on
/// this host, this one and a `serve` child, both loading the plugin from FILE.
public struct PluginChecker: Sendable {
    /// This program (`transfer-engine`), started for the child processes.
    public var executable: String
    /// The plugin file.
    public var path: String
    /// The protocol to check (nil: the first it declares).
    public var protocolName: String?
    /// `device_name` for both engines.
    public var deviceName: String
    /// The environment the children and the engines get (MC_* settings reach the plugin).
    public var environment: [String: String]

    /// A checker for `path`.
    public init(executable: String, path: String, protocolName: String?, deviceName: String, environment: [String: String]) {
        self.executable = executable
        self.path = path
        self.protocolName = protocolName
        self.deviceName = deviceName
        self.environment = environment
    }

    /// Runs every check; `progress` gets each result as it comes.
    public func run(progress: (PluginCheckResult) -> Void = { _ in }) -> [PluginCheckResult] {
        var (results, chosen) = vtableChecks(progress: progress)
        let probe = results.first { $0.name == "probe" }
        let skip: String?
        if case .passed = probe?.outcome, probe?.detail.hasPrefix("ok") == true, let chosen, !chosen.isEmpty {
            skip = nil
        } else {
            skip = probe == nil || probe?.word == "skip" ? "the plugin did not load" : "probe did not answer ok (see probe)"
        }
        let battery = EngineBattery(checker: self, protocolName: protocolName ?? chosen ?? "")
        results += battery.run(skip: skip, progress: progress)
        return results
    }

    // MARK: Vtable checks in child processes

    /// The vtable checks' results, and the protocol the children checked.
    private func vtableChecks(progress: (PluginCheckResult) -> Void) -> ([PluginCheckResult], String?) {
        let names = PluginVtableCheck.names
        var results: [PluginCheckResult] = []
        var chosen: String? = nil
        var next = 0
        while next < names.count {
            // Results come back through a file of their own: the plugin shares the child's stdout.
            let report = FileManager.default.temporaryDirectory.appendingPathComponent("te-check-\(getpid())-\(next).txt").path
            _ = unlink(report)
            let ending = runChild(["plugins", "--check-step", "vtable", "--check-from", "\(next)", "--check-report", report, "--device-name", deviceName]
                                  + (protocolName.map { ["--protocol", $0] } ?? []) + ["--check", path], progress: report)
            let lines = (try? String(contentsOfFile: report, encoding: .utf8))?.split(separator: "\n").map(String.init) ?? []
            _ = unlink(report)
            var begun: Int? = nil
            var reported: [Int: PluginCheckResult] = [:]
            for line in lines {
                if line.hasPrefix("PROTOCOL\t") { chosen = String(line.dropFirst(9)) }
                if line.hasPrefix("BEGIN\t"), let index = Int(line.dropFirst(6)), index >= next, index < names.count { begun = index }
                if let (index, result) = PluginCheckResult.parse(line: line), index >= next, index < names.count, reported[index] == nil {
                    reported[index] = result
                }
            }
            // One result per check, in order; the first check without one is where the child ended.
            while next < names.count, let result = reported[next] {
                results.append(result)
                progress(result)
                next += 1
            }
            guard next < names.count else { break }
            let why = begun == next ? "the checker's child process \(ending) during this check"
                : "the checker's child process \(ending) before reporting this check"
            let result = PluginCheckResult(names[next], .failed(why))
            results.append(result)
            progress(result)
            next += 1
        }
        return (results, chosen)
    }

    /// How long one vtable check may run before its child is stopped (TE_CHECK_TIMEOUT_S, 60 s).
    var checkTimeout: TimeInterval { environment["TE_CHECK_TIMEOUT_S"].flatMap { TimeInterval($0) }.map { min(max($0, 1), 3600) } ?? 60 }

    /// Runs this program with `arguments` (output discarded); how it ended. The child is stopped
    /// when its report file `progress` has not grown for `checkTimeout` (a check hangs).
    func runChild(_ arguments: [String], progress: String) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.environment = environment
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { return "could not start (\(error))" }
        var size = -1
        var lastChange = Date()
        while process.isRunning {
            var info = stat()
            let now = stat(progress, &info) == 0 ? Int(info.st_size) : 0
            if now != size { (size, lastChange) = (now, Date()) }
            if Date().timeIntervalSince(lastChange) > checkTimeout {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
                return "did not finish the check within \(Int(checkTimeout)) s and was stopped"
            }
            usleep(20_000)
        }
        process.waitUntilExit()
        return process.terminationReason == .uncaughtSignal
            ? "was killed by signal \(process.terminationStatus) (\(String(cString: strsignal(process.terminationStatus))))"
            : "exited with status \(process.terminationStatus)"
    }
}
