/// One check of `transfer-engine plugins --check`: what was checked and how it came out.
public struct PluginCheckResult: Sendable, Equatable {
    /// How a check came out.
    public enum Outcome: Sendable, Equatable {
        case passed
        case failed(String)
        case skipped(String)
    }

    /// Short name, e.g. "abi version".
    public var name: String
    /// Pass, fail with the reason, or skipped with the reason.
    public var outcome: Outcome
    /// What was seen (for a pass too), one line.
    public var detail: String

    /// A result.
    public init(_ name: String, _ outcome: Outcome, detail: String = "") {
        self.name = name
        self.outcome = outcome
        self.detail = detail
    }

    /// "pass", "FAIL" or "skip".
    public var word: String {
        switch outcome {
        case .passed: "pass"
        case .failed: "FAIL"
        case .skipped: "skip"
        }
    }

    /// The reason (failed or skipped), else the detail.
    public var explanation: String {
        switch outcome {
        case .passed: detail
        case .failed(let why), .skipped(let why): detail.isEmpty ? why : "\(why) (\(detail))"
        }
    }

    /// One line for a child process to hand the result of check `index` to its parent: index,
    /// name, word and text, tab-separated.
    public func line(index: Int) -> String {
        "RESULT\t\(index)\t\(name.replacingTabsAndNewlines)\t\(word)\t\(explanation.replacingTabsAndNewlines)"
    }

    /// Parses a `line(index:)` line; nil for another line.
    public static func parse(line: String) -> (index: Int, result: PluginCheckResult)? {
        let parts = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 5, parts[0] == "RESULT", let index = Int(parts[1]) else { return nil }
        switch parts[3] {
        case "pass": return (index, PluginCheckResult(parts[2], .passed, detail: parts[4]))
        case "FAIL": return (index, PluginCheckResult(parts[2], .failed(parts[4])))
        case "skip": return (index, PluginCheckResult(parts[2], .skipped(parts[4])))
        default: return nil
        }
    }
}

extension String {
    var replacingTabsAndNewlines: String {
        String(map { $0 == "\t" || $0 == "\n" || $0 == "\r" ? " " : $0 })
    }
}
