import CTransportABI
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A running plugin instance seen through the C vtable: registration,
/// peers, submission, and a poller thread that turns completions into task
/// progress.
final class PluginTransport: @unchecked Sendable {
    /// A slice in flight inside the plugin, keyed by its cookie.
    private struct InFlight {
        var batch: Batch
        var task: Int
        var length: UInt64
    }

    let plugin: LoadedPlugin
    let protocolName: String
    private let instance: OpaquePointer
    private let logger: Logger
    private let services: UnsafeMutablePointer<te_host_services>
    private let inFlight = ConditionLock<(next: UInt64, slices: [UInt64: InFlight], stopping: Bool, pollerDone: Bool)>((1, [:], false, false))
    /// Synchronous callers polling the plugin themselves, and when the last one stopped.
    private let harvesting = ConditionLock<(callers: Int, lastEnd: UInt64)>((0, 0))
    /// How long after a synchronous caller the poller thread stays out of the plugin's poll.
    private static let harvestGraceNs: UInt64 = 200_000
    /// How long the poller sleeps while synchronous callers harvest.
    private static let harvestNapNs: UInt64 = 1_000_000
    private var d: te_plugin_descriptor { plugin.descriptor.pointee }

    /// Host-side state the C callbacks reach through `host_context`.
    final class HostContext {
        let logger: Logger
        let handshake: @Sendable (String, String) throws -> String
        init(logger: Logger, handshake: @escaping @Sendable (String, String) throws -> String) {
            self.logger = logger
            self.handshake = handshake
        }
    }

    /// Creates the instance (`create`) and starts polling.
    init(plugin: LoadedPlugin, protocolName: String, optionsJSON: String, logger: Logger,
         handshake: @escaping @Sendable (_ peerSegment: String, _ requestJSON: String) throws -> String) throws {
        self.plugin = plugin
        self.protocolName = protocolName
        self.logger = logger
        let context = Unmanaged.passRetained(HostContext(logger: logger, handshake: handshake)).toOpaque()
        let services = UnsafeMutablePointer<te_host_services>.allocate(capacity: 1)
        self.services = services
        services.initialize(to: te_host_services(
            struct_size: UInt32(MemoryLayout<te_host_services>.size), reserved: 0, host_context: context,
            log: { context, level, message in
                guard let context, let message else { return }
                let host = Unmanaged<HostContext>.fromOpaque(context).takeUnretainedValue()
                let text = String(cString: message)
                switch level {
                case TE_LOG_TRACE: host.logger.trace("\(text)")
                case TE_LOG_DEBUG: host.logger.debug("\(text)")
                case TE_LOG_INFO: host.logger.info("\(text)")
                case TE_LOG_WARNING: host.logger.warning("\(text)")
                default: host.logger.error("\(text)")
                }
            },
            handshake_send: { context, peer, request, reply in
                guard let context, let peer, let request, let reply else { return TE_ERR_INVALID_ARGUMENT }
                let host = Unmanaged<HostContext>.fromOpaque(context).takeUnretainedValue()
                do {
                    let answer = try host.handshake(String(cString: peer), String(cString: request))
                    return PluginTransport.write(answer, into: reply)
                } catch {
                    host.logger.warning("plugin handshake to \(String(cString: peer)) failed: \(error)")
                    return TE_ERR_PEER_UNREACHABLE
                }
            },
            now_ns: { _ in MonotonicClock.nanoseconds() }))
        var created: OpaquePointer?
        let status = optionsJSON.withCString { plugin.descriptor.pointee.create!($0, services, &created) }
        guard status == TE_OK, let created else {
            throw EngineError.plugin("\(plugin.info.name): create failed (\(PluginStatus.describe(status)))")
        }
        instance = created
        try OSThread.spawn(name: "te-plugin-poll") { [self] in pollLoop() }
    }

    /// Copies `text` into a te_buffer per the ABI's rules.
    static func write(_ text: String, into buffer: UnsafeMutablePointer<te_buffer>) -> Int32 {
        let bytes = Array(text.utf8)
        buffer.pointee.length = bytes.count
        guard let data = buffer.pointee.data, buffer.pointee.capacity > bytes.count else { return TE_ERR_BUFFER_TOO_SMALL }
        bytes.withUnsafeBufferPointer { source in
            UnsafeMutableRawPointer(data).copyMemory(from: source.baseAddress!, byteCount: bytes.count)
        }
        data[bytes.count] = 0
        return TE_OK
    }

    /// The plugin's last error text on this thread.
    var lastError: String { d.last_error.flatMap { $0(instance) }.map { String(cString: $0) } ?? "" }

    private func check(_ status: Int32, _ what: String) throws {
        guard status == TE_OK else {
            throw EngineError.plugin("\(plugin.info.name): \(what) failed (\(PluginStatus.describe(status))): \(lastError)")
        }
    }

    private func jsonObject(_ text: String, _ what: String) throws -> [String: JSONValue] {
        if text.isEmpty { return [:] }
        guard let object = try JSONValue.parse(text).objectValue else {
            throw EngineError.plugin("\(plugin.info.name): \(what) is not a JSON object")
        }
        return object
    }

    /// Keys to merge into the local segment descriptor.
    func localDescriptorFragment() throws -> [String: JSONValue] {
        var out = CStringBuffer(capacity: 4096)
        let status = out.withRetry { d.local_descriptor!(instance, $0) }
        try check(status, "local_descriptor")
        return try jsonObject(out.string, "local_descriptor")
    }

    /// Whether the plugin moves accelerator memory (TE_CAP_MEM_DEVICE).
    var movesDeviceMemory: Bool { plugin.info.capabilities & TE_CAP_MEM_DEVICE != 0 }

    /// Whether the plugin cuts large requests itself (TE_CAP_SPLITS_REQUESTS).
    var splitsRequests: Bool { plugin.info.capabilities & TE_CAP_SPLITS_REQUESTS != 0 }

    /// Whether shutdown() ran: the instance is destroyed and no call may reach the plugin.
    private var isShutDown: Bool { inFlight.withLock { $0.stopping } }

    private func checkAlive(_ what: String) throws {
        if isShutDown { throw EngineError.plugin("\(plugin.info.name): \(what) after the engine shut down") }
    }

    /// Registers memory; returns keys for the buffer's descriptor entry.
    func register(address: UInt64, length: UInt64, location: String) throws -> [String: JSONValue] {
        try checkAlive("register_memory")
        var out = CStringBuffer(capacity: 1024)
        let status = location.withCString { loc in out.withRetry { d.register_memory!(instance, address, length, loc, $0) } }
        try check(status, "register_memory")
        return try jsonObject(out.string, "register_memory fragment")
    }

    /// Memory the plugin allocates itself (ABI 1.1), or nil when it offers none.
    func allocate(length: UInt64, location: String) throws -> UInt64? {
        // Device memory only from a plugin that moves it: a host-memory allocator (shm, cxl)
        // would hand out host memory labelled as a GPU's.
        guard plugin.allocatesMemory, MemoryLocation.isHostAccessible(location) || movesDeviceMemory else { return nil }
        try checkAlive("allocate_memory")
        var address: UInt64 = 0
        let status = location.withCString { d.allocate_memory!(instance, length, $0, &address) }
        try check(status, "allocate_memory(\(length))")
        return address
    }

    /// Returns memory from `allocate`.
    func free(address: UInt64) throws {
        guard plugin.allocatesMemory, !isShutDown else { return }
        try check(d.free_memory!(instance, address), "free_memory")
    }

    /// Unregisters memory.
    func unregister(address: UInt64) throws {
        if isShutDown { return }  // destroy released every registration
        try check(d.unregister_memory!(instance, address), "unregister_memory")
    }

    /// Opens a peer from its descriptor.
    func openPeer(segment: String, descriptor: SegmentDescriptor) throws -> UInt64 {
        try checkAlive("open_peer")
        var handle: UInt64 = 0
        let status = segment.withCString { name in
            descriptor.json.compactText.withCString { d.open_peer!(instance, name, $0, &handle) }
        }
        try check(status, "open_peer(\(segment))")
        return handle
    }

    /// Forgets a peer.
    func closePeer(_ handle: UInt64) {
        if !isShutDown { d.close_peer!(instance, handle) }
    }

    /// Answers a Connection handshake addressed to this plugin.
    func handleHandshake(_ request: String) -> String? {
        var out = CStringBuffer(capacity: 4096)
        let status = request.withCString { req in out.withRetry { d.on_handshake!(instance, req, $0) } }
        if status != TE_OK {
            logger.warning("\(plugin.info.name): on_handshake failed (\(PluginStatus.describe(status))): \(lastError)")
            return nil
        }
        return out.string
    }

    /// Submits slices; each finishes through the batch when the plugin completes it.
    func submit(_ slices: [(op: TransferRequest.Operation, local: UInt64, peer: UInt64, remote: UInt64, length: UInt64, batch: Batch, task: Int)]) {
        var requests: [te_request] = []
        requests.reserveCapacity(slices.count)
        let stopped = inFlight.withLock { state -> Bool in
            if state.stopping { return true }
            for slice in slices {
                let cookie = state.next
                state.next += 1
                state.slices[cookie] = InFlight(batch: slice.batch, task: slice.task, length: slice.length)
                requests.append(te_request(opcode: slice.op == .read ? TE_OP_READ : TE_OP_WRITE, flags: 0, local_addr: slice.local,
                                           peer: slice.peer, remote_addr: slice.remote, length: slice.length, cookie: cookie))
            }
            return false
        }
        if stopped {
            for slice in slices { slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "\(plugin.info.name): engine shut down") }
            return
        }
        var offset = 0
        var idleRounds = 0
        while offset < requests.count {
            var accepted = 0
            let status = requests.withUnsafeBufferPointer { buffer in
                d.submit!(instance, buffer.baseAddress! + offset, requests.count - offset, MemoryLayout<te_request>.stride, &accepted)
            }
            offset += min(accepted, requests.count - offset)
            if status == TE_OK && accepted > 0 { idleRounds = 0; continue }
            if status == TE_ERR_AGAIN || (status == TE_OK && accepted == 0) {
                idleRounds += 1
                if idleRounds < 100_000 { usleep(idleRounds < 100 ? 10 : 1000); continue }  // the poller drains completions meanwhile
            }
            let reason = "\(plugin.info.name): submit failed (\(PluginStatus.describe(status))): \(lastError)"
            for request in requests[offset...] { finish(cookie: request.cookie, status: status, bytes: 0, reason: reason) }
            return
        }
    }

    private func finish(cookie: UInt64, status: Int32, bytes: UInt64, reason: String? = nil) {
        guard let slice = inFlight.withLock({ $0.slices.removeValue(forKey: cookie) }) else { return }
        let error = status == TE_OK ? nil : (reason ?? "\(plugin.info.name): \(PluginStatus.describe(status))")
        slice.batch.sliceFinished(task: slice.task, bytes: status == TE_OK ? slice.length : 0, error: error)
    }

    /// Stops polling, fails what is still in flight, and destroys the instance.
    func shutdown() {
        let first = inFlight.withLock(notify: true) { state -> Bool in
            defer { state.stopping = true }
            return !state.stopping
        }
        guard first else { return }
        _ = inFlight.wait(deadline: MonotonicClock.nanoseconds() + 5_000_000_000) { $0.pollerDone ? true : nil }
        let orphans = inFlight.withLock { state -> [InFlight] in
            defer { state.slices.removeAll() }
            return Array(state.slices.values)
        }
        for slice in orphans { slice.batch.sliceFinished(task: slice.task, bytes: 0, error: "\(plugin.info.name): engine shut down") }
        d.destroy!(instance)
    }

    /// Collects completions that are already available, on the caller's thread (a
    /// synchronous transfer then needs no hand-off to the poller thread).
    func harvest() {
        if isShutDown { return }
        _ = drain(timeoutNs: 0)
    }

    /// Polls the plugin on the caller's thread until `finished()` or the deadline: a synchronous
    /// caller then gets its completion straight from the plugin, without waiting for the poller
    /// thread to pass it on (each thread hand-off costs a wake-up).
    /// It busy-polls (poll with no wait) for `spinNs` first, as verbs benchmarks do: a completion
    /// reaped that way needs no thread wake-up at all.
    func harvest(until finished: () -> Bool, spinNs: UInt64, deadline: UInt64) {
        harvesting.withLock { $0.callers += 1 }
        defer { harvesting.withLock { $0.callers -= 1; $0.lastEnd = MonotonicClock.nanoseconds() } }
        let spinUntil = MonotonicClock.nanoseconds() + spinNs
        while !isShutDown && !finished() && MonotonicClock.nanoseconds() < spinUntil {
            if drain(timeoutNs: 0) != TE_OK { return }
            if !finished() { sched_yield() }
        }
        while !isShutDown && !finished() && MonotonicClock.nanoseconds() < deadline {
            if drain(timeoutNs: 200_000) != TE_OK { return }
        }
    }

    /// One poll call; finishes every completion it returns. Returns the poll status.
    private func drain(timeoutNs: UInt64) -> Int32 {
        // Stack storage: a synchronous caller spins through here, and a heap array per call showed up.
        withUnsafeTemporaryAllocation(of: te_completion.self, capacity: 64) { buffer in
            var count = 0
            let status = d.poll!(instance, buffer.baseAddress, buffer.count, MemoryLayout<te_completion>.stride, timeoutNs, &count)
            guard status == TE_OK else { return status }
            for completion in buffer.prefix(min(count, buffer.count)) {
                finish(cookie: completion.cookie, status: completion.status, bytes: completion.bytes)
            }
            return TE_OK
        }
    }

    private func pollLoop() {
        defer { inFlight.withLock(notify: true) { $0.pollerDone = true } }
        while !inFlight.withLock({ $0.stopping }) {
            // While synchronous callers harvest (or just did), they drain every completion
            // themselves: stay out of the plugin's poll, whose wake-up per completion would take
            // a core from them (measured: 4 KiB shm transfers bimodal at 3 or 7 us). The poller
            // sleeps meanwhile, to the end of the grace period or for one nap while callers
            // harvest (no wake-up per transfer: under emulation every thread switch costs about
            // as much as the transfer); completions of other batches then wait at most a nap.
            let now = MonotonicClock.nanoseconds()
            let (callers, lastEnd) = harvesting.withLock { ($0.callers, $0.lastEnd) }
            if callers > 0 || now &- lastEnd <= Self.harvestGraceNs {
                let until = callers > 0 ? now + Self.harvestNapNs : lastEnd &+ Self.harvestGraceNs &+ 1
                usleep(UInt32((until - now) / 1000))
                continue
            }
            let status = drain(timeoutNs: 10_000_000)
            if status != TE_OK {
                logger.error("\(plugin.info.name): poll failed (\(PluginStatus.describe(status))): \(lastError)")
                usleep(10_000)
            }
        }
    }
}
