import DequeModule
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Client side of the TCP transport towards one peer data port.
///
/// Slices queue on the channel and up to `maxLanes` lane threads, each with
/// its own connection, execute them, so a batch spreads over several
/// connections. Synchronous single transfers skip the queue and run on the
/// caller's thread over an idle pooled connection. Connections are reused
/// until a request on them fails.
final class TCPChannel: @unchecked Sendable {
    struct Settings: Sendable {
        var maxLanes: Int
        var connectTimeoutMs: Int
        var statusTimeoutMs: Int
        var laneIdleMs: Int
        /// Authenticates every new connection when set.
        var auth: PeerAuthenticator? = nil
    }

    /// A lane's private wake-up: set and signalled when the channel hands it work.
    final class LaneWakeup: @unchecked Sendable {
        let woken = ConditionLock(false)
    }

    private struct State {
        var queue = Deque<TransferSlice>()
        var lanes = 0
        /// Idle lanes, most recently idle last. Work goes to the most recent one, so a
        /// light load keeps reusing one warm connection and server thread (FIFO wake-ups
        /// that rotate over the lanes measured 2-3x slower for 1-4 MiB batches).
        var idle: [LaneWakeup] = []
        var idleSockets: [Socket] = []
        /// Connections lanes are using now (shut down by `close` so their I/O ends at once).
        var busySockets: [ObjectIdentifier: Socket] = [:]
        var closed = false
    }

    let host: String
    let port: UInt16
    let acknowledged: Bool
    private let settings: Settings
    private let logger: Logger
    private let state = ConditionLock(State())

    init(host: String, port: UInt16, acknowledged: Bool, settings: Settings, logger: Logger) {
        self.host = host
        self.port = port
        self.acknowledged = acknowledged
        self.settings = settings
        self.logger = logger
    }

    /// Queues slices; lanes pick them up. Never blocks on I/O.
    func enqueue(_ slices: [TransferSlice]) {
        enum Action { case rejected, wake(LaneWakeup), spawn, none }
        let action: Action = state.withLock { state in
            if state.closed { return .rejected }
            state.queue.append(contentsOf: slices)
            if let lane = state.idle.popLast() { return .wake(lane) }
            if state.lanes < settings.maxLanes {
                state.lanes += 1
                return .spawn
            }
            return .none  // every lane is busy; they drain the queue
        }
        switch action {
        case .rejected:
            fail(slices, "tcp channel to \(host):\(port) is closed")
        case .wake(let lane):
            lane.woken.withLock(notify: true) { $0 = true }
        case .spawn:
            startLane()
        case .none:
            break
        }
    }

    /// Ends slices this channel will not run, each through its token.
    private func fail(_ slices: [TransferSlice], _ reason: String) {
        for slice in slices { slice.token.finish(slice, on: "tcp", error: reason) }
    }

    private func startLane() {
        do {
            try OSThread.spawn(name: "te-tcp-lane") { [self] in laneLoop() }
        } catch {
            logger.error("cannot start a tcp lane thread: \(error)")
            // Fail the work instead of leaving it queued forever when no lane runs at all.
            let orphaned: [TransferSlice] = state.withLock { state in
                state.lanes -= 1
                guard state.lanes == 0 else { return [] }
                defer { state.queue.removeAll() }
                return Array(state.queue)
            }
            fail(orphaned, "no tcp lane thread could be started")
        }
    }

    /// Runs one request on the caller's thread (synchronous path).
    func performInline(operation: TCPWire.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64) throws {
        let socket = try takeSocket()
        // Small synchronous requests spin briefly for the answer instead of sleeping.
        let spin: UInt64 = length <= Self.spinThreshold ? Self.spinNanoseconds : 0
        let outcome = performRun([Step(operation: operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length)],
                                 on: socket, spinNanoseconds: spin)
        if outcome.healthy { returnSocket(socket) } else { socket.close() }
        if let error = outcome.errors[0] { throw error }
    }

    /// Fails queued work, ends the lanes' current requests (their connections are shut down) and
    /// waits (at most `waitMs`) until every lane has stopped, so none writes into local memory
    /// after this returns.
    func close(waitMs: Int = 5000) {
        let (pending, sockets, busy, idle): ([TransferSlice], [Socket], [Socket], [LaneWakeup]) = state.withLock { state in
            state.closed = true
            defer { state.queue.removeAll(); state.idleSockets.removeAll(); state.idle.removeAll() }
            return (Array(state.queue), state.idleSockets, Array(state.busySockets.values), state.idle)
        }
        sockets.forEach { $0.close() }
        busy.forEach { $0.shutdownBoth() }
        idle.forEach { lane in lane.woken.withLock(notify: true) { $0 = true } }
        fail(pending, "tcp channel to \(host):\(port) closed")
        let deadline = MonotonicClock.nanoseconds() + UInt64(waitMs) * 1_000_000
        if state.wait(deadline: deadline, until: { $0.lanes == 0 ? true : nil }) == nil {
            logger.warning("tcp channel to \(host):\(port): lanes still running \(waitMs) ms after close")
        }
    }

    private func takeSocket() throws -> Socket {
        if let socket = state.withLock({ $0.idleSockets.popLast() }) { return socket }
        let socket = try Socket.connect(host: host, port: port, timeoutMs: settings.connectTimeoutMs)
        socket.setTimeouts(receiveMs: settings.statusTimeoutMs, sendMs: settings.statusTimeoutMs)
        socket.setKeepAlive(userTimeoutMs: UInt32(settings.statusTimeoutMs))
        if let auth = settings.auth {
            try auth.authenticateAsClient(socket, channel: .data, deadline: MonotonicClock.nanoseconds() + UInt64(settings.connectTimeoutMs) * 1_000_000)
        }
        return socket
    }

    private func returnSocket(_ socket: Socket) {
        let keep = state.withLock { state -> Bool in
            guard !state.closed, state.idleSockets.count < settings.maxLanes else { return false }
            state.idleSockets.append(socket)
            return true
        }
        if !keep { socket.close() }
    }

    /// Synchronous requests up to this size spin for their answer.
    static let spinThreshold: UInt64 = 256 << 10
    /// How long they spin before blocking.
    static let spinNanoseconds: UInt64 = 100_000

    /// Longest run of same-direction slices a lane pipelines on its connection.
    private static let maxRunCount = 64
    /// Byte budget of one run, so a run does not starve the other lanes.
    private static let maxRunBytes: UInt64 = 16 << 20

    /// Takes the next run: the first queued slice plus following slices of the same direction.
    private static func takeRun(from state: inout State) -> [TransferSlice]? {
        guard let first = state.queue.popFirst() else { return nil }
        var run = [first]
        var bytes = first.length
        while run.count < maxRunCount, let candidate = state.queue.first, candidate.operation == first.operation,
              bytes + candidate.length <= maxRunBytes {
            run.append(state.queue.removeFirst())
            bytes += candidate.length
        }
        return run
    }

    private func laneLoop() {
        var socket: Socket?
        defer { socket?.close() }
        let wakeup = LaneWakeup()
        while true {
            // Take work, or register as idle; a lane that leaves work queued wakes another.
            enum Next { case run([TransferSlice], helper: LaneWakeup?, spawn: Bool), idle, closed }
            let next: Next = state.withLock { state in
                if let run = Self.takeRun(from: &state) {
                    guard !state.queue.isEmpty else { return .run(run, helper: nil, spawn: false) }
                    if let helper = state.idle.popLast() { return .run(run, helper: helper, spawn: false) }
                    guard state.lanes < settings.maxLanes else { return .run(run, helper: nil, spawn: false) }
                    state.lanes += 1
                    return .run(run, helper: nil, spawn: true)
                }
                if state.closed { state.lanes -= 1; return .closed }
                wakeup.woken.withLock { $0 = false }
                state.idle.append(wakeup)
                return .idle
            }
            switch next {
            case .closed:
                state.notifyAll()  // a closing channel waits for lanes == 0
                return
            case .idle:
                let deadline = MonotonicClock.nanoseconds() + UInt64(settings.laneIdleMs) * 1_000_000
                if wakeup.woken.wait(deadline: deadline, until: { $0 ? true : nil }) == nil {
                    // Idle too long: retire unless work was handed over meanwhile.
                    let retire = state.withLock { state -> Bool in
                        guard let index = state.idle.firstIndex(where: { $0 === wakeup }) else { return false }
                        state.idle.remove(at: index)
                        state.lanes -= 1
                        return true
                    }
                    if retire { state.notifyAll(); return }
                }
                continue
            case .run(let run, let helper, let spawn):
                if let helper { helper.woken.withLock(notify: true) { $0 = true } }
                if spawn { startLane() }
                process(run, socket: &socket)
            }
        }
    }

    /// Executes one run on the lane's connection and reports each slice. Slices of a canceled
    /// batch are dropped unsent.
    private func process(_ run: [TransferSlice], socket: inout Socket?) {
        var run = run
        if run.contains(where: { $0.token.batch.isCanceled }) {
            fail(run.filter { $0.token.batch.isCanceled }, "canceled before it was sent")
            run.removeAll { $0.token.batch.isCanceled }
            if run.isEmpty { return }
        }
        if socket == nil {
            do { socket = try takeSocket() } catch {
                fail(run, "connect to \(host):\(port): \(error)")
                return
            }
        }
        let id = ObjectIdentifier(socket!)
        let admitted = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.busySockets[id] = socket!
            return true
        }
        guard admitted else {
            fail(run, "tcp channel to \(host):\(port) closed")
            return
        }
        let outcome = performRun(run.map { Step(operation: $0.operation == .read ? .read : .write, localAddress: $0.localAddress,
                                                remoteAddress: $0.remoteAddress, length: $0.length) }, on: socket!)
        state.withLock { _ = $0.busySockets.removeValue(forKey: id) }
        // Successes are reported per batch, so each batch takes its lock once per run; a failure
        // goes through its token (which may resubmit it on another path).
        var reports: [ObjectIdentifier: (Batch, [(task: Int, bytes: UInt64, error: String?)])] = [:]
        for (slice, error) in zip(run, outcome.errors) {
            if let error {
                slice.token.finish(slice, on: "tcp", error: "\(slice.operation) of \(slice.length) bytes to \(host):\(port): \(error)",
                                   rejected: TransferRejection.isRequestRefusal(error))
            } else {
                reports[ObjectIdentifier(slice.token.batch), default: (slice.token.batch, [])].1.append((slice.token.task, slice.length, nil))
            }
        }
        for (batch, slices) in reports.values { batch.slicesFinished(slices) }
        if !outcome.healthy {
            socket?.close()
            socket = nil
        }
    }

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
    func performRun(_ steps: [Step], on socket: Socket, spinNanoseconds: UInt64 = 0) -> RunOutcome {
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
                try socket.sendAll(parts)
            } catch {
                // The server answers a rejected write before reading its payload: collect what it said.
                if acknowledged {
                    socket.setTimeouts(receiveMs: 200, sendMs: settings.statusTimeoutMs)
                    try? socket.receiveAll((0..<count).map(status))
                }
                return failed(error, completedBefore: acknowledged ? firstNotOK() : 0)
            }
            guard acknowledged else { return RunOutcome(errors: Array(repeating: nil, count: count), healthy: true) }
            if spinNanoseconds > 0 { socket.spinUntilReadable(nanoseconds: spinNanoseconds) }
            do {
                try socket.receiveAll([UnsafeMutableRawBufferPointer(start: statuses, count: count * TCPWire.statusFrameSize)])
            } catch {
                return failed(error, completedBefore: firstNotOK())
            }
            let bad = firstNotOK()
            if bad < count { return failed(TransferRejection(status: TCPWire.decodeStatusFrame(statuses[bad]) ?? UInt32.max), completedBefore: bad) }
            return RunOutcome(errors: Array(repeating: nil, count: count), healthy: true)

        case .read:
            do {
                try socket.sendAll([UnsafeRawBufferPointer(headers)])
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
                try socket.receiveAll(parts)
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
