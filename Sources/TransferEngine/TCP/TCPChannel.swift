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
        private(set) var queue = Deque<TransferSlice>()
        /// Bytes of the queued slices (sizes the runs of reads).
        private(set) var queuedBytes: UInt64 = 0
        var lanes = 0
        /// Idle lanes, most recently idle last. Work goes to the most recent one, so a
        /// light load keeps reusing one warm connection and server thread (FIFO wake-ups
        /// that rotate over the lanes measured 2-3x slower for 1-4 MiB batches).
        var idle: [LaneWakeup] = []
        var idleSockets: [Socket] = []
        /// Connections lanes are using now (shut down by `close` so their I/O ends at once).
        var busySockets: [ObjectIdentifier: Socket] = [:]
        var closed = false

        mutating func push(_ slices: [TransferSlice]) {
            queue.append(contentsOf: slices)
            for slice in slices {
                let (sum, overflow) = queuedBytes.addingReportingOverflow(slice.length)
                queuedBytes = overflow ? .max : sum  // saturating: the figure only sizes runs
            }
        }

        mutating func popFirst() -> TransferSlice? {
            guard let slice = queue.popFirst() else { return nil }
            queuedBytes = queue.isEmpty ? 0 : queuedBytes - min(queuedBytes, slice.length)
            return slice
        }

        /// Empties the queue, returning what it held.
        mutating func removeAllQueued() -> [TransferSlice] {
            defer { queue.removeAll(); queuedBytes = 0 }
            return Array(queue)
        }
    }

    let host: String
    let port: UInt16
    let acknowledged: Bool
    let settings: Settings
    private let logger: Logger
    private let state = ConditionLock(State())
    /// Whether small synchronous requests spin for their answer (measured, see WaitPolicy).
    private let waitPolicy = ConditionLock(WaitPolicy())

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
            state.push(slices)
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
                return state.removeAllQueued()
            }
            fail(orphaned, "no tcp lane thread could be started")
        }
    }

    /// Runs one request on the caller's thread (synchronous path).
    /// Its I/O stops at `deadline` (monotonic ns, 0: none).
    func performInline(operation: TCPWire.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64,
                       deadline: UInt64 = 0) throws {
        let socket = try takeSocket()
        // Small synchronous requests may spin briefly for the answer instead of sleeping, where
        // that has recently been the quicker way.
        let small = length <= Self.spinThreshold
        let spins = small && waitPolicy.withLock({ $0.spins })
        let spin: UInt64 = spins ? Self.spinNanoseconds : 0
        let started = small ? MonotonicClock.nanoseconds() : 0
        let outcome = performRun([Step(operation: operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length)],
                                 on: socket, spinNanoseconds: spin, deadline: deadline)
        if small && outcome.errors[0] == nil {
            let took = MonotonicClock.nanoseconds() - started
            waitPolicy.withLock { $0.record(took, spun: spins) }
        }
        if outcome.healthy { returnSocket(socket) } else { Self.discard(socket, after: outcome) }
        if let error = outcome.errors[0] { throw error }
    }

    /// Fails queued work, ends the lanes' current requests (their connections are shut down) and
    /// waits (at most `waitMs`) until every lane has stopped, so none writes into local memory
    /// after this returns.
    func close(waitMs: Int = 5000) {
        let (pending, sockets, busy, idle): ([TransferSlice], [Socket], [Socket], [LaneWakeup]) = state.withLock { state in
            state.closed = true
            defer { state.idleSockets.removeAll(); state.idle.removeAll() }
            return (state.removeAllQueued(), state.idleSockets, Array(state.busySockets.values), state.idle)
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

    /// Closes a connection a run left unusable; one given up at a deadline is reset, so no
    /// queued byte of it reaches the peer later.
    private static func discard(_ socket: Socket, after outcome: RunOutcome) {
        if outcome.errors.contains(where: { $0 is DeadlinePassed }) { socket.abort() } else { socket.close() }
    }

    /// An idle pooled connection for the synchronous path, or a new one. A lane always connects
    /// its own: its buffers are bounded towards a peer on this host (`SameHostBuffers`),
    /// which must happen before any data arrives, and it keeps the connection until it retires.
    private func takeSocket(forLane: Bool = false) throws -> Socket {
        if !forLane, let socket = state.withLock({ $0.idleSockets.popLast() }) { return socket }
        let socket = try Socket.connect(host: host, port: port, timeoutMs: settings.connectTimeoutMs)
        socket.setTimeouts(receiveMs: settings.statusTimeoutMs, sendMs: settings.statusTimeoutMs)
        socket.setKeepAlive(userTimeoutMs: UInt32(settings.statusTimeoutMs))
        if forLane { SameHostBuffers.apply(to: socket, side: .lane) }
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
    /// Byte budget of one run of reads, so a run does not starve the other lanes. A lane asks for
    /// the next run only after this one's data arrived, so shorter runs leave the server idle more
    /// often (README, "Performance"); but a short queue is split over the lanes instead (a 4 MiB
    /// request is four 1 MiB slices: with two lanes free, two runs of two on two connections at once).
    private static let maxReadRunBytes: UInt64 = 16 << 20

    /// The budget for a run of reads: the queued bytes (its own included) shared among the lanes
    /// that can take work now (this one, the idle ones, and those not started yet), so that a short
    /// queue is spread over them at once; busy lanes come back for the rest. Never under 1 MiB:
    /// splitting less costs a lane's wake-up for little copying (4 KiB x64 reads slowed beside a
    /// busy neighbour).
    static func readRunBudget(queuedBytes: UInt64, availableLanes: Int) -> UInt64 {
        let lanes = UInt64(max(1, availableLanes))
        let share = queuedBytes / lanes + (queuedBytes % lanes == 0 ? 0 : 1)
        return min(maxReadRunBytes, max(minReadRunBytes, share))
    }

    /// The smallest budget of a run of reads.
    private static let minReadRunBytes: UInt64 = 1 << 20

    /// Byte budget of one run of writes. Short runs spread a batch (or one large request) over the
    /// lanes in small turns, and keep the bytes in flight on a connection few enough to stay in
    /// cache while the server copies them (README, "Performance").
    private static let maxWriteRunBytes: UInt64 = 2 << 20

    /// Takes the next run: the first queued slice plus following slices of the same direction.
    private func takeRun(from state: inout State) -> [TransferSlice]? {
        let readBudget = Self.readRunBudget(queuedBytes: state.queuedBytes,
                                            availableLanes: 1 + state.idle.count + max(0, settings.maxLanes - state.lanes))
        guard let first = state.popFirst() else { return nil }
        var run = [first]
        var bytes = first.length
        let budget = first.operation == .write ? Self.maxWriteRunBytes : readBudget
        while run.count < Self.maxRunCount, let candidate = state.queue.first, candidate.operation == first.operation,
              bytes + candidate.length <= budget, let next = state.popFirst() {
            run.append(next)
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
                if let run = takeRun(from: &state) {
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
    /// batch, or past their deadline, are dropped unsent; the run's I/O stops at its nearest deadline.
    private func process(_ run: [TransferSlice], socket: inout Socket?) {
        var run = run
        if run.contains(where: { $0.token.batch.isCanceled }) {
            fail(run.filter { $0.token.batch.isCanceled }, "canceled before it was sent")
            run.removeAll { $0.token.batch.isCanceled }
            if run.isEmpty { return }
        }
        let now = MonotonicClock.nanoseconds()
        if run.contains(where: { $0.deadline != 0 && $0.deadline <= now }) {
            for slice in run where slice.deadline != 0 && slice.deadline <= now {
                slice.token.finish(slice, on: "tcp", error: "\(slice.operation) of \(slice.length) bytes to \(host):\(port): \(DeadlinePassed(started: false))",
                                   rejected: true)
            }
            run.removeAll { $0.deadline != 0 && $0.deadline <= now }
            if run.isEmpty { return }
        }
        let deadline = run.reduce(UInt64.max) { $1.deadline == 0 ? $0 : min($0, $1.deadline) }
        if socket == nil {
            do { socket = try takeSocket(forLane: true) } catch {
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
                                                remoteAddress: $0.remoteAddress, length: $0.length) }, on: socket!,
                                 deadline: deadline == UInt64.max ? 0 : deadline)
        state.withLock { _ = $0.busySockets.removeValue(forKey: id) }
        // Successes are reported per batch, so each batch takes its lock once per run; a failure
        // goes through its token (which may resubmit it on another path).
        var reports: [ObjectIdentifier: (Batch, [(task: Int, bytes: UInt64, error: String?)])] = [:]
        let finishedAt = MonotonicClock.nanoseconds()
        for (slice, runError) in zip(run, outcome.errors) {
            if var error = runError {
                // The run stopped at its nearest deadline: only the slices whose own deadline passed
                // end there; the others lost their connection and may go to another path.
                let ownDeadlinePassed = slice.deadline != 0 && finishedAt >= slice.deadline
                if error is DeadlinePassed && !ownDeadlinePassed { error = ConnectionLost(cause: "another request's deadline reset the connection") }
                slice.token.finish(slice, on: "tcp", error: "\(slice.operation) of \(slice.length) bytes to \(host):\(port): \(error)",
                                   rejected: TransferRejection.isRequestRefusal(error) || error is DeadlinePassed)
            } else {
                reports[ObjectIdentifier(slice.token.batch), default: (slice.token.batch, [])].1.append((slice.token.task, slice.length, nil))
            }
        }
        for (batch, slices) in reports.values { batch.slicesFinished(slices) }
        if !outcome.healthy, let broken = socket {
            Self.discard(broken, after: outcome)
            socket = nil
        }
    }
}
