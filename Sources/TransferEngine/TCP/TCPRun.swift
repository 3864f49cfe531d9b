#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The wire side of a TCP channel: one run of requests on one connection, in the official format,
/// and the errors a run ends with.
extension TCPChannel {
    /// One request of a run.
    struct Step {
        var operation: TCPWire.Operation
        var localAddress: UInt64
        var remoteAddress: UInt64
        var length: UInt64
    }

    /// Per-step errors (nil = done) and whether the connection can be reused.
    struct RunOutcome {
        var errors: [Error?]
        var healthy: Bool
    }

    /// A run whose requests are on the wire and whose answers are still to come, or whose
    /// outcome the send phase already decided. Owns its header and status buffers until collected.
    struct SentRun {
        let steps: [Step]
        /// Monotonic ns its I/O stops at (0: none).
        let deadline: UInt64
        fileprivate let headers: UnsafeMutableRawBufferPointer
        fileprivate let statuses: UnsafeMutablePointer<UInt64>
        /// Set when the send phase already decided the outcome (nothing left to collect).
        fileprivate var decided: RunOutcome?
    }

    /// Sends a run of same-direction requests back to back in the official wire format, then
    /// collects the answers in order (the server handles a connection's requests sequentially).
    /// With a `deadline` (monotonic ns, 0: none) its I/O stops there: the run then fails with
    /// `DeadlinePassed` and nothing more of it lands in local memory.
    func performRun(_ steps: [Step], on socket: Socket, spinNanoseconds: UInt64 = 0, deadline: UInt64 = 0) -> RunOutcome {
        collectRun(sendRun(steps, on: socket, deadline: deadline), on: socket, spinNanoseconds: spinNanoseconds)
    }

    /// The send phase of a run. Writes: all headers and payloads in one gathered send. Reads: all
    /// headers in one send. A lane sends its next run before collecting this one's answers, so the
    /// peer never waits for the lane between runs; the answers wait in the socket meanwhile.
    func sendRun(_ steps: [Step], on socket: Socket, deadline: UInt64 = 0) -> SentRun {
        let count = steps.count
        var run = SentRun(steps: steps, deadline: deadline,
                          headers: UnsafeMutableRawBufferPointer.allocate(byteCount: count * TCPWire.headerSize, alignment: 8),
                          statuses: UnsafeMutablePointer<UInt64>.allocate(capacity: count))
        run.statuses.initialize(repeating: 0, count: count)
        if deadline != 0, MonotonicClock.nanoseconds() >= deadline {
            run.decided = RunOutcome(errors: Array(repeating: DeadlinePassed(started: false), count: count), healthy: true)
            return run
        }
        for (i, step) in steps.enumerated() {
            TCPWire.Header(size: step.length, address: step.remoteAddress, operation: step.operation, acknowledged: acknowledged)
                .encode(into: UnsafeMutableRawBufferPointer(rebasing: run.headers[(i * TCPWire.headerSize)...]))
        }
        let bounded: UInt64? = deadline == 0 ? nil : deadline
        do {
            switch steps[0].operation {
            case .write:
                try socket.sendAll(count: count * 2, { i in i % 2 == 0 ? run.header(i / 2) : UnsafeRawBufferPointer(run.payload(i / 2)) },
                                   deadline: bounded, callLimitMs: settings.statusTimeoutMs)
            case .read:
                try socket.sendAll([UnsafeRawBufferPointer(run.headers)], deadline: bounded, callLimitMs: settings.statusTimeoutMs)
            }
        } catch {
            // The server answers a rejected write before reading its payload: collect what it said.
            if steps[0].operation == .write, acknowledged {
                socket.setTimeouts(receiveMs: 200, sendMs: settings.statusTimeoutMs)
                try? socket.receiveAll((0..<count).map(run.status))
                run.decided = run.failed(error, completedBefore: run.firstNotOK(), acknowledged: true)
            } else {
                run.decided = run.failed(error, completedBefore: 0, acknowledged: acknowledged)
            }
        }
        finishedPhase(&run, on: socket)
        return run
    }

    /// The collect phase: status frames (and, for reads, data scattered straight into place),
    /// then the run's buffers are released.
    func collectRun(_ sent: SentRun, on socket: Socket, spinNanoseconds: UInt64 = 0) -> RunOutcome {
        var run = sent
        defer { run.release() }
        if run.decided == nil { receiveAnswers(&run, on: socket, spinNanoseconds: spinNanoseconds) }
        finishedPhase(&run, on: socket)
        return run.decided ?? RunOutcome(errors: Array(repeating: nil, count: run.steps.count), healthy: true)
    }

    /// After a phase: puts back the socket's usual timeouts, and names a timeout at the deadline as such.
    private func finishedPhase(_ run: inout SentRun, on socket: Socket) {
        guard run.deadline != 0 else { return }
        if run.decided?.healthy ?? true { socket.restoreTimeouts(settings.statusTimeoutMs) }
        if var outcome = run.decided, MonotonicClock.nanoseconds() >= run.deadline {
            outcome.errors = outcome.errors.map { $0.map { Self.isTimeout($0) ? DeadlinePassed(started: true) : $0 } }
            run.decided = outcome
        }
    }

    private func receiveAnswers(_ run: inout SentRun, on socket: Socket, spinNanoseconds: UInt64) {
        let count = run.steps.count
        let bounded: UInt64? = run.deadline == 0 ? nil : run.deadline
        if spinNanoseconds > 0 { socket.spinUntilReadable(nanoseconds: spinNanoseconds) }
        switch run.steps[0].operation {
        case .write:
            guard acknowledged else { return }
            do {
                try socket.receiveAll([UnsafeMutableRawBufferPointer(start: run.statuses, count: count * TCPWire.statusFrameSize)],
                                      deadline: bounded, callLimitMs: settings.statusTimeoutMs)
            } catch {
                run.decided = run.failed(error, completedBefore: run.firstNotOK(), acknowledged: true)
                return
            }
        case .read:
            let parts = acknowledged ? count * 2 : count
            do {
                try socket.receiveAll(count: parts, { i in
                    acknowledged ? (i % 2 == 0 ? run.status(i / 2) : run.payload(i / 2)) : run.payload(i)
                }, deadline: bounded, callLimitMs: settings.statusTimeoutMs)
            } catch {
                guard acknowledged else {
                    run.decided = run.failed(error, completedBefore: 0, acknowledged: false)
                    return
                }
                // A rejected step's frame arrives whole after the previous step's data, so every
                // earlier step is done. A missing frame means the step before it may be cut short.
                let bad = run.firstNotOK()
                if bad < count, let code = TCPWire.decodeStatusFrame(run.statuses[bad]), code != TCPWire.Status.ok.rawValue {
                    run.decided = run.failed(error, completedBefore: bad, acknowledged: true)
                } else {
                    run.decided = run.failed(error, completedBefore: max(0, bad - 1), acknowledged: true)
                }
                return
            }
        }
        if acknowledged {
            let bad = run.firstNotOK()
            if bad < count {
                run.decided = run.failed(TransferRejection(status: TCPWire.decodeStatusFrame(run.statuses[bad]) ?? UInt32.max), completedBefore: bad,
                                         acknowledged: true)
            }
        }
    }

    /// Whether a run's error is its socket timing out (the connection or its peer lost, as such).
    private static func isTimeout(_ error: Error) -> Bool {
        if case .timedOut = error as? SocketError { return true }
        if let lost = error as? ConnectionLost { return lost.cause.hasSuffix("timed out") }
        return false
    }
}

extension TCPChannel.SentRun {
    /// Whether its answers are still to be read (the send phase did not decide its outcome).
    var awaitsAnswers: Bool { decided == nil }

    /// Frees its buffers; after this it is not used again.
    func release() {
        headers.deallocate()
        statuses.deallocate()
    }

    fileprivate func header(_ i: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: headers[(i * TCPWire.headerSize)..<((i + 1) * TCPWire.headerSize)])
    }

    fileprivate func payload(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: UInt(steps[i].localAddress)), count: Int(steps[i].length))
    }

    fileprivate func status(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: statuses + i, count: TCPWire.statusFrameSize)
    }

    /// Index of the first step whose status frame is missing or not OK.
    fileprivate func firstNotOK() -> Int {
        (0..<steps.count).first { TCPWire.decodeStatusFrame(statuses[$0]) != TCPWire.Status.ok.rawValue } ?? steps.count
    }

    /// Steps before `firstUnfinished` are done; the rest fail with `failure` or a reason read from their status.
    fileprivate func failed(_ failure: Error, completedBefore firstUnfinished: Int, acknowledged: Bool) -> TCPChannel.RunOutcome {
        var errors: [Error?] = Array(repeating: nil, count: steps.count)
        for i in firstUnfinished..<steps.count {
            if acknowledged, i == firstUnfinished, let code = TCPWire.decodeStatusFrame(statuses[i]), code != TCPWire.Status.ok.rawValue {
                errors[i] = TransferRejection(status: code)
            } else if acknowledged, i == firstUnfinished, statuses[i] != 0, TCPWire.decodeStatusFrame(statuses[i]) == nil {
                errors[i] = TransferRejection(status: UInt32.max)
            } else {
                errors[i] = i == firstUnfinished ? failure : ConnectionLost(cause: "\(failure)")
            }
        }
        return TCPChannel.RunOutcome(errors: errors, healthy: false)
    }
}

/// The request's deadline passed: before it was sent (`started` false, nothing moved) or while
/// its bytes were on the wire (the connection is reset, so nothing more of it lands here; a write
/// may have reached the peer in part).
struct DeadlinePassed: Error, CustomStringConvertible {
    var started: Bool
    var description: String {
        started ? "its deadline passed in flight; the connection was reset, so nothing more of it lands here"
            : "its deadline passed before it was sent"
    }
}

/// The connection broke while this request waited behind an earlier one.
struct ConnectionLost: Error, CustomStringConvertible {
    var cause: String
    var description: String { "connection lost before this request finished: \(cause)" }
}

/// A non-OK v2 status frame (or a frame without the magic).
struct TransferRejection: Error, CustomStringConvertible {
    var status: UInt32

    /// Whether `error` is the peer refusing this request's range (not a broken path).
    static func isRequestRefusal(_ error: Error) -> Bool {
        (error as? TransferRejection)?.status == TCPWire.Status.addressRejected.rawValue
    }

    var description: String {
        switch status {
        case TCPWire.Status.addressRejected.rawValue: return "the peer rejected the address range (ADDR_REJECTED)"
        case UInt32.max: return "the peer sent a malformed status frame"
        default: return "the peer answered status \(status)"
        }
    }
}
