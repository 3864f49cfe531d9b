/// Whether a thread waiting for a short exchange (a synchronous request's answer, a
/// connection's next request) spins before it blocks, chosen from what each way recently cost.
///
/// Neither way wins everywhere. Where cores are idle, a blocked thread pays a wake-up (on a
/// virtual machine a halted CPU takes tens of microseconds to wake) that a short spin avoids.
/// Where every core is busy (the inference framework's own threads beside the engine), a
/// spinning thread holds the core that the thread it waits for needs, and a spin costs several
/// times the wake-up. So the policy measures instead of guessing: it waits the current way for a
/// while, then the other way for `probeWaits`, and switches when the probe's median wait is
/// clearly (by `switchMargin`) below the median of the current way's latest waits. The while
/// doubles after each probe that changed nothing (from `fewestBetweenProbes` to
/// `mostBetweenProbes` waits), so a settled choice pays for a probe rarely; and a probe starts at
/// once when the current way's latest waits take `changeFactor` times what they took when the
/// choice was last made (the machine changed against it: a neighbour started beside a spinner,
/// or left a blocker to wake idle cores). Several threads may share one policy: a wait counts
/// only if it went the way the policy says now (`record(_:spun:)`).
struct WaitPolicy {
    /// Waits between probes of the other way right after a switch, and at most.
    static let fewestBetweenProbes = 256
    static let mostBetweenProbes = 8192
    /// Waits in one probe (and the latest waits of the current way that it is compared with).
    static let probeWaits = 16
    /// A probe's median must be below this share of the current median to switch.
    static let switchMargin = 0.85
    /// The current way's median growing this much since the last choice starts a probe.
    static let changeFactor: UInt64 = 2
    /// Longer waits are recorded as this long (an idle gap says nothing about the way of waiting).
    static let longestRecordedNs: UInt64 = 2_000_000

    /// The way in use outside probes.
    private(set) var spinning: Bool
    private var probing = false
    private var count = 0
    private var betweenProbes = fewestBetweenProbes
    /// The current way's median when the choice was last made (0: not yet).
    private var settled: UInt64 = 0
    /// The latest waits of the current way (a ring) and the current probe's.
    private var recent = [UInt64](repeating: 0, count: probeWaits)
    private var probe = [UInt64](repeating: 0, count: probeWaits)

    /// A policy that starts spinning (`spinFirst`) or blocking.
    init(spinFirst: Bool = true) { spinning = spinFirst }

    /// Whether the next wait spins.
    var spins: Bool { probing ? !spinning : spinning }

    /// Records how long a wait took (ns) that spun (`spun`) or blocked; a wait that went the
    /// other way than the policy says now (another thread's record moved it on) is left out.
    mutating func record(_ nanoseconds: UInt64, spun: Bool) {
        guard spun == spins else { return }
        let wait = min(nanoseconds, Self.longestRecordedNs)
        if probing {
            probe[count] = wait
            count += 1
            guard count == Self.probeWaits else { return }
            let current = Self.median(recent)
            if Double(Self.median(probe)) < Double(current) * Self.switchMargin {
                spinning.toggle()
                recent = probe
                betweenProbes = Self.fewestBetweenProbes
            } else {
                betweenProbes = min(betweenProbes * 2, Self.mostBetweenProbes)
            }
            settled = Self.median(recent)
            probing = false
            count = 0
        } else {
            recent[count % Self.probeWaits] = wait
            count += 1
            let changed = count % Self.probeWaits == 0 && settled > 0 && Self.median(recent) > settled * Self.changeFactor
            if count >= betweenProbes || changed {
                probing = true
                count = 0
            }
        }
    }

    private static func median(_ values: [UInt64]) -> UInt64 { values.sorted()[values.count / 2] }
}
