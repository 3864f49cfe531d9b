/// Parses byte sizes the way Mooncake configs write them.
///
/// Accepts a plain integer ("1073741824") or a number with a unit: B, K/KB/KiB,
/// M/MB/MiB, G/GB/GiB, T/TB/TiB (case-insensitive, optional space, decimal
/// fractions allowed). As in upstream's config loader, KB/MB/GB/TB are binary
/// (1024-based), the same as KiB/MiB/GiB/TiB.
public enum ByteSize {
    /// Returns the size in bytes or throws a message naming the bad text.
    public static func parse(_ text: String) throws -> UInt64 {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty else { throw EngineError.invalidConfiguration("empty size") }
        let numberEnd = trimmed.firstIndex { !($0.isNumber || $0 == ".") } ?? trimmed.endIndex
        let numberText = String(trimmed[..<numberEnd])
        let unitText = trimmed[numberEnd...].trimmingCharacters(in: .whitespaces).lowercased()
        let multipliers: [String: UInt64] = [
            "": 1, "b": 1,
            "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
            "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
            "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
            "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
        ]
        guard let multiplier = multipliers[unitText] else {
            throw EngineError.invalidConfiguration("size '\(text)': unknown unit '\(unitText)' (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
        }
        if let whole = UInt64(numberText) {
            let (value, overflow) = whole.multipliedReportingOverflow(by: multiplier)
            guard !overflow else { throw EngineError.invalidConfiguration("size '\(text)' is too large") }
            return value
        }
        guard let fractional = Double(numberText), fractional >= 0, fractional.isFinite else {
            throw EngineError.invalidConfiguration("size '\(text)' is not a number with an optional unit")
        }
        let value = (fractional * Double(multiplier)).rounded()
        guard value < 1.8e19 else { throw EngineError.invalidConfiguration("size '\(text)' is too large") }
        return UInt64(value)
    }

    /// Human form with binary units, e.g. "64 MiB", "4 KiB", "100 B".
    public static func format(_ bytes: UInt64) -> String {
        let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        for (size, name) in units where bytes >= size {
            if bytes % size == 0 { return "\(bytes / size) \(name)" }
            let value = Double(bytes) / Double(size)
            return "\((value * 100).rounded() / 100) \(name)"
        }
        return "\(bytes) B"
    }
}
