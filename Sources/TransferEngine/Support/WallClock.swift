#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The wall clock broken into calendar fields with microseconds, for timestamps in logs and
/// segment descriptors (no Foundation in the engine library).
struct WallClock {
    var year: Int32, month: Int32, day: Int32, hour: Int32, minute: Int32, second: Int32, microsecond: Int32

    /// Now, in UTC or in the local time zone.
    static func now(utc: Bool) -> WallClock {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        var seconds = spec.tv_sec
        var parts = tm()
        if utc { gmtime_r(&seconds, &parts) } else { localtime_r(&seconds, &parts) }
        return WallClock(year: parts.tm_year + 1900, month: parts.tm_mon + 1, day: parts.tm_mday, hour: parts.tm_hour,
                         minute: parts.tm_min, second: parts.tm_sec, microsecond: Int32(spec.tv_nsec / 1000))
    }

    /// "2026-12-06", then `separator`, then "16:38:47.123456".
    func formatted(separator: String) -> String {
        func pad(_ value: Int32, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(year)-\(pad(month, 2))-\(pad(day, 2))\(separator)\(pad(hour, 2)):\(pad(minute, 2)):\(pad(second, 2)).\(pad(microsecond, 6))"
    }
}
