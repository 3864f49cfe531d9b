/// Readings of the metrics: what `/metrics/json`, `get_metrics()` and the MC_TE_METRIC line show.
/// Counters are read from the Prometheus text of the registry (the one source of truth), so the
/// JSON and the scrape always agree.
public enum MetricsSnapshot {
    /// One series: its labels and value.
    public struct Sample: Equatable, Sendable {
        public var name: String
        public var labels: [String: String]
        public var value: Double
    }

    /// The samples of Prometheus text (comments skipped; a malformed line is skipped too).
    public static func parse(_ text: String) -> [Sample] {
        var samples: [Sample] = []
        for raw in text.split(separator: "\n") where !raw.hasPrefix("#") {
            let line = Substring(raw)
            var labels: [String: String] = [:]
            let name: Substring, rest: Substring
            if let open = line.firstIndex(of: "{") {
                guard let close = line.lastIndex(of: "}"), close > open else { continue }
                name = line[..<open]
                guard let parsed = parseLabels(line[line.index(after: open)..<close]) else { continue }
                labels = parsed
                rest = line[line.index(after: close)...]
            } else {
                guard let space = line.firstIndex(of: " ") else { continue }
                name = line[..<space]
                rest = line[space...]
            }
            let number = rest.split(separator: " ").first.map(String.init) ?? ""
            let value: Double? = number == "+Inf" ? .infinity : number == "-Inf" ? -.infinity : Double(number)
            guard let value, !name.isEmpty else { continue }
            samples.append(Sample(name: String(name), labels: labels, value: value))
        }
        return samples
    }

    /// `a="x",b="y\"z"` → labels; nil when malformed.
    static func parseLabels(_ text: Substring) -> [String: String]? {
        var labels: [String: String] = [:]
        var index = text.startIndex
        while index < text.endIndex {
            guard let equals = text[index...].firstIndex(of: "="), text.index(after: equals) < text.endIndex,
                  text[text.index(after: equals)] == "\"" else { return nil }
            let key = String(text[index..<equals])
            var value = ""
            var cursor = text.index(equals, offsetBy: 2)
            var closed = false
            while cursor < text.endIndex {
                let c = text[cursor]
                if c == "\\", text.index(after: cursor) < text.endIndex {
                    let next = text[text.index(after: cursor)]
                    value.append(next == "n" ? "\n" : next)
                    cursor = text.index(cursor, offsetBy: 2)
                    continue
                }
                if c == "\"" { closed = true; cursor = text.index(after: cursor); break }
                value.append(c)
                cursor = text.index(after: cursor)
            }
            guard closed else { return nil }
            labels[key] = value
            if cursor < text.endIndex, text[cursor] == "," { cursor = text.index(after: cursor) }
            index = cursor
        }
        return labels
    }

    /// The sum of the samples named `name` whose labels include `match`.
    public static func sum(_ samples: [Sample], _ name: String, where match: [String: String] = [:]) -> Double {
        samples.reduce(0) { total, sample in
            sample.name == name && match.allSatisfy({ sample.labels[$0.key] == $0.value }) ? total + sample.value : total
        }
    }

    /// Each metric summed over its labels (histograms as their `_count` and `_sum`; buckets left
    /// out) and every sample: {"enabled": true, "totals": {...}, "series": [...]}.
    public static func json(_ samples: [Sample], enabled: Bool) -> JSONValue {
        var counters: [String: JSONValue] = [:]
        var series: [JSONValue] = []
        for sample in samples where !sample.name.hasSuffix("_bucket") {
            let total = counters[sample.name].flatMap { if case .double(let v) = $0 { v } else { nil } } ?? 0
            counters[sample.name] = .double(total + (sample.value.isFinite ? sample.value : 0))
            series.append(.object(["name": .string(sample.name), "labels": .object(sample.labels.mapValues { .string($0) }),
                                   "value": .double(sample.value)]))
        }
        return .object(["enabled": .bool(enabled), "totals": .object(counters), "series": .array(series)])
    }

    /// One line in the spirit of upstream's `[Metrics]` log: throughput since `previous`, requests, failures, failovers.
    public static func summary(_ now: [Sample], previous: [Sample], seconds: Double) -> String {
        func delta(_ name: String, _ match: [String: String] = [:]) -> Double { sum(now, name, where: match) - sum(previous, name, where: match) }
        func rate(_ op: String) -> String {
            let bytes = delta("te_transferred_bytes_total", ["operation": op])
            let requests = delta("te_requests_total", ["operation": op]), failed = delta("te_request_failures_total", ["operation": op])
            let mbps = seconds > 0 ? bytes / seconds / 1e6 : 0
            return "\(op) \(formatted(mbps)) MB/s (\(Int(requests)) requests, \(Int(failed)) failed)"
        }
        return "[Metrics] Transfer Engine Stats (last \(formatted(seconds)) s): \(rate("write")) | \(rate("read")) | failovers \(Int(delta("te_failovers_total")))"
            + " | in flight \(Int(sum(now, "te_requests_in_flight")))"
    }

    private static func formatted(_ value: Double) -> String {
        let scaled = (value * 10).rounded() / 10
        return scaled == scaled.rounded() ? String(Int(scaled)) + ".0" : String(scaled)
    }
}
