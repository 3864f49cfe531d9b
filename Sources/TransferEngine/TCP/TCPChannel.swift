import DequeModule
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One piece of a task sent as one TCP request.
struct TCPSlice: @unchecked Sendable {
    var operation: TCPWire.Operation
    var localAddress: UInt64
    var remoteAddress: UInt64
    var length: UInt64
    var batch: Batch
    var task: Int
}

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
    }

    private struct State {
        var queue = Deque<TCPSlice>()
        var lanes = 0
        var idleLanes = 0
        var idleSockets: [Socket] = []
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
    func enqueue(_ slices: [TCPSlice]) {
        var toStart = 0
        let rejected: Bool = state.withLock(notify: true) { state in
            if state.closed { return true }
            state.queue.append(contentsOf: slices)
            let wanted = min(settings.maxLanes, state.lanes + max(0, state.queue.count - state.idleLanes))
            toStart = max(0, wanted - state.lanes)
            state.lanes += toStart
            return false
        }
        if rejected {
            for slice in slices { slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "tcp channel to \(host):\(port) is closed") }
            return
        }
        for _ in 0..<toStart {
            do {
                try OSThread.spawn(name: "te-tcp-lane") { [self] in laneLoop() }
            } catch {
                state.withLock { $0.lanes -= 1 }
                logger.error("cannot start a tcp lane thread: \(error)")
            }
        }
        // If no lane could start at all, fail the work instead of leaving it queued forever.
        let orphaned: [TCPSlice] = state.withLock { state in
            guard state.lanes == 0 else { return [] }
            defer { state.queue.removeAll() }
            return Array(state.queue)
        }
        for slice in orphaned { slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "no tcp lane thread could be started") }
    }

    /// Runs one request on the caller's thread (synchronous path).
    func performInline(operation: TCPWire.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64) throws {
        let socket = try takeSocket()
        do {
            try perform(operation: operation, localAddress: localAddress, remoteAddress: remoteAddress, length: length, on: socket)
            returnSocket(socket)
        } catch {
            socket.close()
            throw error
        }
    }

    /// Stops the lanes after their current request and fails queued work.
    func close() {
        let (pending, sockets): ([TCPSlice], [Socket]) = state.withLock(notify: true) { state in
            state.closed = true
            defer { state.queue.removeAll(); state.idleSockets.removeAll() }
            return (Array(state.queue), state.idleSockets)
        }
        sockets.forEach { $0.close() }
        for slice in pending { slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "tcp channel to \(host):\(port) closed") }
    }

    private func takeSocket() throws -> Socket {
        if let socket = state.withLock({ $0.idleSockets.popLast() }) { return socket }
        let socket = try Socket.connect(host: host, port: port, timeoutMs: settings.connectTimeoutMs)
        socket.setTimeouts(receiveMs: settings.statusTimeoutMs, sendMs: settings.statusTimeoutMs)
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

    private func laneLoop() {
        var socket: Socket?
        defer { socket?.close() }
        while true {
            let deadline = MonotonicClock.nanoseconds() + UInt64(settings.laneIdleMs) * 1_000_000
            state.withLock { $0.idleLanes += 1 }
            let next: TCPSlice?? = state.wait(deadline: deadline) { state -> TCPSlice?? in
                if let slice = state.queue.popFirst() { return .some(slice) }
                if state.closed { return .some(nil) }
                return nil
            }
            state.withLock { $0.idleLanes -= 1 }
            guard let work = next, let slice = work else {
                // Idle too long or closed: retire, unless work arrived meanwhile.
                let retire = state.withLock { state -> Bool in
                    if state.queue.isEmpty || state.closed { state.lanes -= 1; return true }
                    return false
                }
                if retire { return }
                continue
            }
            do {
                if socket == nil { socket = try takeSocket() }
                try perform(operation: slice.operation, localAddress: slice.localAddress,
                            remoteAddress: slice.remoteAddress, length: slice.length, on: socket!)
                slice.batch.sliceFinished(task: slice.task, bytes: slice.length, error: nil)
            } catch {
                socket?.close()
                socket = nil
                slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "\(slice.operation) of \(slice.length) bytes to \(host):\(port): \(error)")
            }
        }
    }

    /// One request/response exchange in the official wire format.
    private func perform(operation: TCPWire.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64, on socket: Socket) throws {
        let header = TCPWire.Header(size: length, address: remoteAddress, operation: operation, acknowledged: acknowledged)
        var headerBytes = (UInt64(0), UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &headerBytes) { header.encode(into: $0) }
        let local = UnsafeMutableRawPointer(bitPattern: UInt(localAddress))!
        let count = Int(length)
        switch operation {
        case .write:
            do {
                try withUnsafeBytes(of: &headerBytes) { head in
                    try socket.sendAll([head, UnsafeRawBufferPointer(start: local, count: count)])
                }
            } catch {
                // The server answers a rejected write before reading its payload: surface that reason.
                if acknowledged, let status = try? readStatus(socket), status != TCPWire.Status.ok.rawValue {
                    throw TransferRejection(status: status)
                }
                throw error
            }
            if acknowledged {
                let status = try readStatus(socket)
                if status != TCPWire.Status.ok.rawValue { throw TransferRejection(status: status) }
            }
        case .read:
            try withUnsafeBytes(of: &headerBytes) { try socket.sendAll([$0]) }
            if acknowledged {
                let status = try readStatus(socket)
                if status != TCPWire.Status.ok.rawValue { throw TransferRejection(status: status) }
            }
            try socket.receiveAll(local, count: count)
        }
    }

    private func readStatus(_ socket: Socket) throws -> UInt32 {
        var raw: UInt64 = 0
        try socket.receiveAll(&raw, count: TCPWire.statusFrameSize)
        guard let status = TCPWire.decodeStatusFrame(raw) else { throw TransferRejection(status: UInt32.max) }
        return status
    }
}

/// A non-OK v2 status frame (or a frame without the magic).
struct TransferRejection: Error, CustomStringConvertible {
    var status: UInt32
    var description: String {
        switch status {
        case TCPWire.Status.addressRejected.rawValue: return "the peer rejected the address range (ADDR_REJECTED)"
        case UInt32.max: return "the peer sent a malformed status frame"
        default: return "the peer answered status \(status)"
        }
    }
}
