import ArgumentParser
import Foundation
import Synchronization

/// `load`: a busy neighbour for benchmarks (an inference framework's own threads on the same
/// cores): threads that spin on arithmetic until a deadline, or until standard input closes.
struct LoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Keep N threads busy for a bounded time: the busy neighbour of `bench --background-load`.",
        discussion: """
        Each thread spins on integer arithmetic (no memory traffic, no system calls) until --seconds
        pass, or until standard input closes with --exit-on-stdin-close. Prints READY once every
        thread runs. `bench --background-load N` and scripts/bench.sh start it beside the benchmark
        (and beside the official engine's), so both are measured next to the same neighbour.
        """
    )

    @Option(help: "Busy threads (1...256).")
    var threads: Int = 1

    @Option(help: "Stop after this many seconds (0.1...3600).")
    var seconds: Double = 60

    @Flag(help: "Stop when standard input closes (the parent exited or closed the pipe).")
    var exitOnStdinClose = false

    func validate() throws {
        if !(1...256).contains(threads) { throw ValidationError("--threads must be in 1...256") }
        if !(0.1...3600).contains(seconds) { throw ValidationError("--seconds must be in 0.1...3600") }
    }

    func run() throws {
        let state = BusyLoop.State()
        let deadline = Date().addingTimeInterval(seconds)
        for _ in 0..<threads {
            let worker = Thread {
                state.running.add(1, ordering: .relaxed)
                BusyLoop.spin(until: deadline, state: state)
                state.running.subtract(1, ordering: .relaxed)
            }
            worker.start()
        }
        while state.running.load(ordering: .relaxed) < threads && Date() < deadline { usleep(1000) }
        FileHandle.standardOutput.write(Data("READY threads=\(threads) seconds=\(seconds)\n".utf8))
        if exitOnStdinClose {
            Thread.detachNewThread {
                // read(2), not FileHandle: a read error must end the wait, not the process.
                var byte: UInt8 = 0
                while read(0, &byte, 1) > 0 {}
                state.stop.store(true, ordering: .relaxed)
            }
        }
        while state.running.load(ordering: .relaxed) > 0 { usleep(10_000) }
    }
}

/// The spinning itself.
enum BusyLoop {
    /// What the threads share: a stop request and how many spin.
    final class State: Sendable {
        let stop = Atomic<Bool>(false)
        let running = Atomic<Int>(0)
    }

    /// Spins until `deadline` or a stop request, looking at the clock every few microseconds.
    static func spin(until deadline: Date, state stopState: State) {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        let end = deadline.timeIntervalSinceReferenceDate
        while !stopState.stop.load(ordering: .relaxed) && Date().timeIntervalSinceReferenceDate < end {
            for _ in 0..<4096 { state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407 }
        }
        // Keeps the arithmetic (the optimiser drops a loop whose result is unused).
        if state == 42 { print("") }
    }
}
