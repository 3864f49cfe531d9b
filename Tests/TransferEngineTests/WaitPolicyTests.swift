import Testing
@testable import TransferEngine

/// The spin-or-block choice (WaitPolicy) against synthetic machines: each way's wait time given,
/// the policy must settle on the quicker way, follow a change within a few probes, and probe
/// rarely once settled.
@Suite("Wait policy")
struct WaitPolicyTests {
    /// Runs `waits` waits where spinning costs `spin` ns and blocking `block` ns; returns how many spun.
    private func run(_ policy: inout WaitPolicy, waits: Int, spin: UInt64, block: UInt64) -> Int {
        var spun = 0
        for _ in 0..<waits {
            let spins = policy.spins
            if spins { spun += 1 }
            policy.record(spins ? spin : block, spun: spins)
        }
        return spun
    }

    @Test("an idle machine (spinning 11 us, a wake-up 70 us): it keeps spinning and probes blocking rarely")
    func idleKeepsSpinning() {
        var policy = WaitPolicy()
        let spun = run(&policy, waits: 50_000, spin: 11_000, block: 70_000)
        #expect(policy.spinning)
        // Probes of 16 waits, every 256, 512, ... up to 8192 waits: well under 1% of the waits.
        #expect(spun > 50_000 - 300, "\(50_000 - spun) waits blocked")
    }

    @Test("a neighbour takes the cores (spinning now 60 us, blocking 10 us): it switches to blocking within a few dozen waits")
    func busyMachineBlocks() {
        var policy = WaitPolicy()
        _ = run(&policy, waits: 50_000, spin: 11_000, block: 70_000)  // settled on spinning, probing rarely
        var waits = 0
        while policy.spinning && waits < 10_000 {
            policy.record(policy.spins ? 60_000 : 10_000, spun: policy.spins)
            waits += 1
        }
        #expect(!policy.spinning)
        #expect(waits <= 64, "took \(waits) waits to switch")
        // And back once the neighbour leaves (blocking 70 us again, spinning 11 us).
        waits = 0
        while !policy.spinning && waits < 10_000 {
            policy.record(policy.spins ? 11_000 : 70_000, spun: policy.spins)
            waits += 1
        }
        #expect(policy.spinning && waits <= 64, "took \(waits) waits to switch back")
    }

    @Test("ways within the margin of each other: no flapping between them")
    func closeWaysDoNotFlap() {
        var policy = WaitPolicy()
        var switches = 0
        var previous = policy.spinning
        for i in 0..<20_000 {
            policy.record(policy.spins ? 10_000 + UInt64(i % 7) * 100 : 10_500, spun: policy.spins)
            if policy.spinning != previous { switches += 1; previous = policy.spinning }
        }
        #expect(switches == 0)
    }

    @Test("an idle gap is recorded as at most 2 ms: one long pause does not decide the way")
    func longGapsAreCapped() {
        var policy = WaitPolicy(spinFirst: false)
        // Blocking is the better way; a few enormous gaps in the current way's waits must not flip it.
        for i in 0..<2_000 { policy.record(policy.spins ? 50_000 : (i % 100 == 0 ? 5_000_000_000 : 10_000), spun: policy.spins) }
        #expect(!policy.spinning)
    }

    @Test("several threads share one policy: a wait that went the other way than the policy says now is left out")
    func waitsOfTheOtherWayAreLeftOut() {
        var policy = WaitPolicy()
        // Spinning is the better way (11 us against 70). Other threads report quick waits that
        // spun, decided before a probe began; counted in the probe they would make blocking
        // look quick (two of every three probe samples) and switch the policy to it.
        for _ in 0..<20_000 {
            let spins = policy.spins
            policy.record(spins ? 11_000 : 70_000, spun: spins)
            policy.record(1_000, spun: true)
            policy.record(1_000, spun: true)
        }
        #expect(policy.spinning)
    }
}
