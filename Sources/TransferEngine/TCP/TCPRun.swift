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

    /// Sends a run of same-direction requests back to back in the official wire format, then
    /// collects the answers in order (the server handles a connection's requests sequentially).
    /// Writes: all headers and payloads in one gathered send, then the status frames.
    /// Reads: all headers in one send, then status frames and data scattered straight into place.
    /// With a `deadline` (monotonic ns, 0: none) its I/O stops there: the run then fails with
    /// `DeadlinePassed` and nothing more of it lands in local memory.
    func performRun(_ steps: [Step], on socket: Socket, spinNanoseconds: UInt64 = 0, deadline: UInt64 = 0) -> RunOutcome {
        guard deadline != 0 else { return performRun(steps, on: socket, spinNanoseconds: spinNanoseconds, bounded: nil) }
        guard MonotonicClock.nanoseconds() < deadline else {
            return RunOutcome(errors: Array(repeating: DeadlinePassed(started: false), count: steps.count), healthy: true)
        }
        // Every socket call waits at most what is left of the deadline (see Socket.bound).
        var outcome = performRun(steps, on: socket, spinNanoseconds: spinNanoseconds, bounded: deadline)
        if outcome.healthy { socket.restoreTimeouts(settings.statusTimeoutMs) }
        if MonotonicClock.nanoseconds() >= deadline {
            outcome.errors = outcome.errors.map { $0.map { Self.isTimeout($0) ? DeadlinePassed(started: true) : $0 } }
        }
        return outcome
    }

    /// How long a failed write run waits for the status frames already on their way: 200 ms, or
    /// what is left of `deadline` (1 ms once it passed: frames that arrived are still read).
    static func statusWaitMs(until deadline: UInt64?, now: UInt64 = MonotonicClock.nanoseconds()) -> Int {
        guard let deadline else { return 200 }
        guard now < deadline else { return 1 }
        return Int(min(200, (deadline - now) / 1_000_000 + 1))
    }

    /// Whether a run's error is its socket timing out (the connection or its peer lost, as such).
    private static func isTimeout(_ error: Error) -> Bool {
        if case .timedOut = error as? SocketError { return true }
        if let lost = error as? ConnectionLost { return lost.cause.hasSuffix("timed out") }
        return false
    }

    private func performRun(_ steps: [Step], on socket: Socket, spinNanoseconds: UInt64, bounded deadline: UInt64?) -> RunOutcome {
        let count = steps.count
        let headers = UnsafeMutableRawBufferPointer.allocate(byteCount: count * TCPWire.headerSize, alignment: 8)
        let statuses = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
        defer { headers.deallocate(); statuses.deallocate() }
        statuses.initialize(repeating: 0, count: count)
        for (i, step) in steps.enumerated() {
            TCPWire.Header(size: step.length, address: step.remoteAddress, operation: step.operation, acknowledged: acknowledged)
                .encode(into: UnsafeMutableRawBufferPointer(rebasing: headers[(i * TCPWire.headerSize)...]))
        }
        func header(_ i: Int) -> UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(rebasing: headers[(i * TCPWire.headerSize)..<((i + 1) * TCPWire.headerSize)])
        }
        func payload(_ i: Int) -> UnsafeMutableRawBufferPointer {
            UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: UInt(steps[i].localAddress)), count: Int(steps[i].length))
        }
        func status(_ i: Int) -> UnsafeMutableRawBufferPointer {
            UnsafeMutableRawBufferPointer(start: statuses + i, count: TCPWire.statusFrameSize)
        }
        /// Steps before `firstUnfinished` are done; the rest fail with `failure` or a reason read from their status.
        func failed(_ failure: Error, completedBefore firstUnfinished: Int) -> RunOutcome {
            var errors: [Error?] = Array(repeating: nil, count: count)
            for i in firstUnfinished..<count {
                if acknowledged, i == firstUnfinished, let code = TCPWire.decodeStatusFrame(statuses[i]), code != TCPWire.Status.ok.rawValue {
                    errors[i] = TransferRejection(status: code)
                } else if acknowledged, i == firstUnfinished, statuses[i] != 0, TCPWire.decodeStatusFrame(statuses[i]) == nil {
                    errors[i] = TransferRejection(status: UInt32.max)
                } else {
                    errors[i] = i == firstUnfinished ? failure : ConnectionLost(cause: "\(failure)")
                }
            }
            return RunOutcome(errors: errors, healthy: false)
        }
        /// Index of the first step whose status frame is missing or not OK.
        func firstNotOK() -> Int {
            (0..<count).first { TCPWire.decodeStatusFrame(statuses[$0]) != TCPWire.Status.ok.rawValue } ?? count
        }

        switch steps[0].operation {
        case .write:
            var parts: [UnsafeRawBufferPointer] = []
            parts.reserveCapacity(count * 2)
            for i in 0..<count { parts.append(header(i)); parts.append(UnsafeRawBufferPointer(payload(i))) }
            do {
                try socket.sendAll(parts, deadline: deadline, callLimitMs: settings.statusTimeoutMs)
            } catch {
                // The server answers a rejected write before reading its payload: collect what it
                // said, waiting at most 200 ms and not past the deadline (a send to a peer that
                // stopped reading ends there).
                if acknowledged {
                    socket.setTimeouts(receiveMs: Self.statusWaitMs(until: deadline), sendMs: settings.statusTimeoutMs)
                    try? socket.receiveAll((0..<count).map(status))
                }
                return failed(error, completedBefore: acknowledged ? firstNotOK() : 0)
            }
            guard acknowledged else { return RunOutcome(errors: Array(repeating: nil, count: count), healthy: true) }
            if spinNanoseconds > 0 { socket.spinUntilReadable(nanoseconds: spinNanoseconds) }
            do {
                try socket.receiveAll([UnsafeMutableRawBufferPointer(start: statuses, count: count * TCPWire.statusFrameSize)], deadline: deadline,
                                      callLimitMs: settings.statusTimeoutMs)
            } catch {
                return failed(error, completedBefore: firstNotOK())
            }
            let bad = firstNotOK()
            if bad < count { return failed(TransferRejection(status: TCPWire.decodeStatusFrame(statuses[bad]) ?? UInt32.max), completedBefore: bad) }
            return RunOutcome(errors: Array(repeating: nil, count: count), healthy: true)

        case .read:
            do {
                try socket.sendAll([UnsafeRawBufferPointer(headers)], deadline: deadline, callLimitMs: settings.statusTimeoutMs)
            } catch {
                return failed(error, completedBefore: 0)
            }
            if spinNanoseconds > 0 { socket.spinUntilReadable(nanoseconds: spinNanoseconds) }
            var parts: [UnsafeMutableRawBufferPointer] = []
            parts.reserveCapacity(count * 2)
            for i in 0..<count {
                if acknowledged { parts.append(status(i)) }
                parts.append(payload(i))
            }
            do {
                try socket.receiveAll(parts, deadline: deadline, callLimitMs: settings.statusTimeoutMs)
            } catch {
                guard acknowledged else { return failed(error, completedBefore: 0) }
                // A rejected step's frame arrives whole after the previous step's data, so every
                // earlier step is done. A missing frame means the step before it may be cut short.
                let bad = firstNotOK()
                if bad < count, let code = TCPWire.decodeStatusFrame(statuses[bad]), code != TCPWire.Status.ok.rawValue {
                    return failed(error, completedBefore: bad)
                }
                return failed(error, completedBefore: max(0, bad - 1))
            }
            if acknowledged {
                let bad = firstNotOK()
                if bad < count { return failed(TransferRejection(status: TCPWire.decodeStatusFrame(statuses[bad]) ?? UInt32.max), completedBefore: bad) }
            }
            return RunOutcome(errors: Array(repeating: nil, count: count), healthy: true)
        }
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
