import CTransportABI
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A running plugin instance seen through the C vtable: registration,
/// peers, submission, and a poller thread that turns completions into task
/// progress.
final class PluginTransport: Transport, @unchecked Sendable {
    /// Marks the cookie of a synchronous caller's request (`transferOne`): it is not in `slices`
    /// (a dictionary insert and removal hash the key: a share of a small transfer), but in
    /// `syncWaiting`, a short list (one entry per thread inside `transferOne`).
    static let syncCookie: UInt64 = 1 << 63
    /// How a request ended in the plugin: its status, and the host's reason text if it has one.
    typealias Ending = (status: Int32, reason: String?)
    /// A synchronous request's result that a thread other than its caller reaped.
    struct SyncResult {
        var cookie: UInt64
        var status: Int32
        var reason: String?
    }

    let plugin: LoadedPlugin
    let protocolName: String
    let instance: OpaquePointer
    let logger: Logger
    let services: UnsafeMutablePointer<te_host_services>
    /// How long a synchronous caller busy-polls the plugin before it waits (MC_PLUGIN_SYNC_SPIN_US).
    let syncSpinNs: UInt64
    /// Requests up to this size run synchronously on the caller's thread unless the plugin splits requests itself.
    let inlineLimit: UInt64
    /// How long past its deadline a synchronous caller waits for the plugin to give its request
    /// back (its buffer may be in use until then; MC_FREE_BATCH_WAIT_MS).
    let releaseGraceNs: UInt64
    /// Whether its devices' figures go to the metrics (its engine records them): tracked from
    /// creation, read a last time at shutdown.
    let recordsDeviceMetrics: Bool
    /// Whether small synchronous callers busy-poll before they wait (measured, see WaitPolicy).
    let syncWaitPolicy = ConditionLock(WaitPolicy())

    /// What is in flight, and who polls the plugin for it.
    struct State {
        var next: UInt64 = 1
        var slices: [UInt64: TransferSlice] = [:]
        var stopping = false
        var pollerDone = false
        /// Synchronous callers polling the plugin themselves: they finish every completion meanwhile.
        var syncCallers = 0
        /// Cookies of the synchronous callers' requests in flight, and the results of those
        /// that another thread reaped.
        var syncWaiting: [UInt64] = []
        var syncResults: [SyncResult] = []
        /// The poller thread waits on the condition for work.
        var pollerParked = false
        /// The poller has work: slices in flight and no synchronous caller harvesting them.
        var pollerNeeded: Bool { !slices.isEmpty && syncCallers == 0 }
    }
    let inFlight = ConditionLock<State>(State())
    /// Set once by shutdown(): read without the lock by callers that spin.
    let stopped = Atomic<Bool>(false)
    /// Calls into the instance in progress (see `entered`).
    let calls = Atomic<Int>(0)
    /// Synchronous requests whose completion another thread reaped (tests read it).
    let syncReapedElsewhere = Atomic<Int>(0)
    /// Completions for cookies that are not in flight: reported twice, or never submitted (a plugin bug).
    let strayCompletions = Atomic<Int>(0)
    /// Completions of synchronous requests whose caller was no longer waiting: after it timed
    /// out, or reported twice.
    let unclaimedSyncCompletions = Atomic<Int>(0)
    /// Moving average of how long recent small synchronous transfers took to complete (ns).
    let syncAverageNs = Atomic<UInt64>(0)
    /// The longest a synchronous caller busy-polls for, however slow its transfers are.
    static let maxAdaptiveSpinNs: UInt64 = 2_000_000
    var d: te_plugin_descriptor { plugin.descriptor.pointee }

    /// Creates the instance (`create`) and starts polling.
    init(plugin: LoadedPlugin, protocolName: String, optionsJSON: String, syncSpinNs: UInt64, inlineLimit: UInt64,
         releaseGraceNs: UInt64 = 5_000_000_000, recordsDeviceMetrics: Bool = false, logger: Logger,
         handshake: @escaping @Sendable (_ peerSegment: String, _ requestJSON: String) throws -> String) throws {
        self.plugin = plugin
        self.protocolName = protocolName
        self.syncSpinNs = syncSpinNs
        self.inlineLimit = inlineLimit
        self.releaseGraceNs = releaseGraceNs
        self.logger = logger
        let services = PluginHostServices.make(logger: logger, handshake: handshake)
        self.services = services
        var created: OpaquePointer?
        let status = optionsJSON.withCString { plugin.descriptor.pointee.create!($0, services, &created) }
        guard status == TE_OK, let created else {
            throw EngineError.plugin("\(plugin.info.name): create failed (\(PluginStatus.describe(status)))")
        }
        instance = created
        self.recordsDeviceMetrics = recordsDeviceMetrics
        try OSThread.spawn(name: "te-plugin-poll") { [self] in pollLoop() }
        if recordsDeviceMetrics { DeviceMetrics.track(self) }
    }

    /// The plugin's last error text on this thread.
    var lastError: String {
        entered { () -> String in d.last_error.flatMap { $0(instance) }.map { String(cString: $0) } ?? "" } ?? ""
    }

    /// Runs `body`, a call into the instance, unless shutdown began (then nil). `shutdown` waits
    /// for every call in progress to return before it destroys the instance, so no call ever
    /// reaches a destroyed one; no lock is held across the call.
    @inline(__always)
    func entered<R>(_ body: () throws -> R) rethrows -> R? {
        // Checked before counting too: once shutdown began, callers leave the count alone and it drains.
        if stopped.load(ordering: .sequentiallyConsistent) { return nil }
        calls.add(1, ordering: .sequentiallyConsistent)
        defer { calls.subtract(1, ordering: .sequentiallyConsistent) }
        if stopped.load(ordering: .sequentiallyConsistent) { return nil }
        return try body()
    }

    func shutDownError(_ what: String) -> EngineError {
        EngineError.plugin("\(plugin.info.name): \(what) after the transport was shut down")
    }

    func check(_ status: Int32, _ what: String) throws {
        guard status == TE_OK else {
            throw EngineError.plugin("\(plugin.info.name): \(what) failed (\(PluginStatus.describe(status))): \(lastError)")
        }
    }

    func jsonObject(_ text: String, _ what: String) throws -> [String: JSONValue] {
        if text.isEmpty { return [:] }
        guard let object = try JSONValue.parse(text).objectValue else {
            throw EngineError.plugin("\(plugin.info.name): \(what) is not a JSON object")
        }
        return object
    }

    /// Keys to merge into the local segment descriptor.
    func localDescriptorFragment() throws -> [String: JSONValue] {
        var out = CStringBuffer(capacity: 4096)
        guard let status = entered({ out.withRetry { d.local_descriptor!(instance, $0) } }) else { throw shutDownError("local_descriptor") }
        try check(status, "local_descriptor")
        return try jsonObject(out.string, "local_descriptor")
    }

    /// Whether the plugin moves accelerator memory (TE_CAP_MEM_DEVICE).
    var movesDeviceMemory: Bool { plugin.info.capabilities & TE_CAP_MEM_DEVICE != 0 }

    /// Whether the plugin cuts large requests itself (TE_CAP_SPLITS_REQUESTS).
    var splitsRequests: Bool { plugin.info.capabilities & TE_CAP_SPLITS_REQUESTS != 0 }

    /// Whether shutdown() began: no new call may reach the plugin.
    var isShutDown: Bool { stopped.load(ordering: .acquiring) }

    /// Registers memory; returns keys for the buffer's descriptor entry.
    func register(address: UInt64, length: UInt64, location: String) throws -> [String: JSONValue] {
        var out = CStringBuffer(capacity: 1024)
        guard let status = entered({ location.withCString { loc in out.withRetry { d.register_memory!(instance, address, length, loc, $0) } } })
        else { throw shutDownError("register_memory") }
        try check(status, "register_memory")
        return try jsonObject(out.string, "register_memory fragment")
    }

    /// Memory the plugin allocates itself (ABI 1.1), or nil when it offers none.
    func allocate(length: UInt64, location: String) throws -> UInt64? {
        // Device memory only from a plugin that moves it: a host-memory allocator (shm, cxl)
        // would hand out host memory labelled as a GPU's.
        guard plugin.allocatesMemory, MemoryLocation.isHostAccessible(location) || movesDeviceMemory else { return nil }
        var address: UInt64 = 0
        guard let status = entered({ location.withCString { d.allocate_memory!(instance, length, $0, &address) } })
        else { throw shutDownError("allocate_memory") }
        if status == TE_ERR_NOT_SUPPORTED { return nil }  // not for this location: the host's allocator
        try check(status, "allocate_memory(\(length))")
        return address
    }

    /// Returns memory from `allocate`.
    func free(address: UInt64) throws {
        guard plugin.allocatesMemory, let status = entered({ d.free_memory!(instance, address) }) else { return }
        try check(status, "free_memory")
    }

    /// Unregisters memory.
    func unregister(address: UInt64) throws {
        // After shutdown: destroy released every registration.
        guard let status = entered({ d.unregister_memory!(instance, address) }) else { return }
        try check(status, "unregister_memory")
    }

    func connect(segment: String, view: SegmentDescriptor, host: String) throws -> any TransportPeer {
        PluginPeer(transport: self, handle: try openPeer(segment: segment, descriptor: view), segment: segment)
    }

    /// Opens a peer from its descriptor.
    func openPeer(segment: String, descriptor: SegmentDescriptor) throws -> UInt64 {
        var handle: UInt64 = 0
        let json = descriptor.json.compactText
        guard let status = entered({ segment.withCString { name in json.withCString { d.open_peer!(instance, name, $0, &handle) } } })
        else { throw shutDownError("open_peer") }
        try check(status, "open_peer(\(segment))")
        return handle
    }

    /// Forgets a peer.
    func closePeer(_ handle: UInt64) {
        _ = entered { d.close_peer!(instance, handle) }
    }

    /// Answers a Connection handshake addressed to this plugin.
    func handleHandshake(_ request: String) -> String? {
        var out = CStringBuffer(capacity: 4096)
        guard let status = entered({ request.withCString { req in out.withRetry { d.on_handshake!(instance, req, $0) } } }) else { return nil }
        if status != TE_OK {
            logger.warning("\(plugin.info.name): on_handshake failed (\(PluginStatus.describe(status))): \(lastError)")
            return nil
        }
        return out.string
    }

    /// Submits slices to `peer` (a handle from open_peer); each ends through its token when the plugin completes it.
    func submit(_ slices: [TransferSlice], peer: UInt64) {
        var requests: [te_request] = []
        requests.reserveCapacity(slices.count)
        let (stopped, wakePoller) = inFlight.withLock { state -> (Bool, Bool) in
            if state.stopping { return (true, false) }
            for slice in slices {
                let cookie = state.next
                state.next += 1
                state.slices[cookie] = slice
                requests.append(te_request(opcode: slice.operation == .read ? TE_OP_READ : TE_OP_WRITE, flags: 0, local_addr: slice.localAddress,
                                           peer: peer, remote_addr: slice.remoteAddress, length: slice.length, cookie: cookie))
            }
            return (false, state.pollerParked && state.pollerNeeded)
        }
        if wakePoller { inFlight.notifyAll() }
        if stopped {
            for slice in slices { slice.token.finish(slice, on: protocolName, error: "\(plugin.info.name): engine shut down") }
            return
        }
        let (offset, status) = requests.withUnsafeBufferPointer { submitRequests($0) }
        guard status != TE_OK else { return }
        let reason = submitFailure(status)
        for request in requests[offset...] { finish(cookie: request.cookie, status: status, bytes: 0, reason: reason) }
    }

    /// Hands `requests` to the plugin, retrying while it has no room (the poller or a synchronous
    /// caller drains completions meanwhile). Returns how many it took and the status that stopped it.
    /// `gated: false` when the caller is already inside `entered`.
    func submitRequests(_ requests: UnsafeBufferPointer<te_request>, gated: Bool = true) -> (accepted: Int, status: Int32) {
        var offset = 0
        var idleRounds = 0
        while offset < requests.count {
            var accepted = 0
            let start = requests.baseAddress! + offset, left = requests.count - offset, stride = MemoryLayout<te_request>.stride
            let result: Int32?
            if gated {
                result = entered { d.submit!(instance, start, left, stride, &accepted) }
            } else {
                result = d.submit!(instance, start, left, stride, &accepted)
            }
            guard let status = result else { return (offset, TE_ERR_INTERNAL) }
            offset += min(accepted, requests.count - offset)
            if status == TE_OK && accepted > 0 { idleRounds = 0; continue }
            if status == TE_ERR_AGAIN || (status == TE_OK && accepted == 0) {
                idleRounds += 1
                if idleRounds < 100_000 { usleep(idleRounds < 100 ? 10 : 1000); continue }
                // Still no room after ~100 s: fail what is left (an OK that took nothing is no success).
                return (offset, TE_ERR_AGAIN)
            }
            return (offset, status)
        }
        return (offset, TE_OK)
    }

    func submitFailure(_ status: Int32) -> String {
        "\(plugin.info.name): submit failed (\(PluginStatus.describe(status))): \(lastError)"
    }

    /// Completion statuses that refuse the request itself (its range, its memory), not the path.
    static func isRequestRefusal(_ status: Int32) -> Bool {
        status == TE_ERR_OUT_OF_RANGE || status == TE_ERR_INVALID_ARGUMENT || status == TE_ERR_REJECTED
    }

    func failureText(_ status: Int32, _ reason: String?) -> String? {
        status == TE_OK ? nil : (reason ?? "\(plugin.info.name): \(PluginStatus.describe(status))")
    }

    /// Stops polling, waits for every call into the instance to return, destroys the instance
    /// (which stops its work), and only then fails what it still held: a slice failed over to
    /// another transport can no longer be moved by this one too.
    func shutdown() {
        let first = inFlight.withLock(notify: true) { state -> Bool in
            defer { state.stopping = true }
            return !state.stopping
        }
        guard first else { return }
        stopped.store(true, ordering: .sequentiallyConsistent)
        _ = inFlight.wait(deadline: MonotonicClock.nanoseconds() + 5_000_000_000) { $0.pollerDone ? true : nil }
        let giveUp = MonotonicClock.nanoseconds() + 10_000_000_000
        while calls.load(ordering: .sequentiallyConsistent) > 0 && MonotonicClock.nanoseconds() < giveUp { usleep(100) }
        if calls.load(ordering: .sequentiallyConsistent) > 0 {
            // A call that never returns: destroying under it would be worse than leaking the instance.
            logger.error("\(plugin.info.name): a call into the plugin did not return within 10 s of shutdown; the instance is left undestroyed")
            if recordsDeviceMetrics { DeviceMetrics.finish(self, devices: nil) }
        } else {
            // The devices' last figures, now that nothing more completes.
            if recordsDeviceMetrics { DeviceMetrics.finish(self, devices: readDeviceStats()) }
            d.destroy!(instance)
        }
        let orphans = inFlight.withLock { state -> [TransferSlice] in
            defer { state.slices.removeAll() }
            return Array(state.slices.values)
        }
        for slice in orphans { slice.token.finish(slice, on: protocolName, error: "\(plugin.info.name): engine shut down") }
    }

    /// Polls the plugin while slices are in flight that no synchronous caller harvests; parked
    /// otherwise, so a run of synchronous transfers wakes this thread not once.
    func pollLoop() {
        defer { inFlight.withLock(notify: true) { $0.pollerDone = true } }
        while true {
            let stop = inFlight.wait { state -> Bool? in
                if state.stopping { return true }
                if state.pollerNeeded { state.pollerParked = false; return false }
                state.pollerParked = true
                return nil
            }
            if stop == true { break }
            let status = drain(timeoutNs: 10_000_000)
            if status != TE_OK {
                logger.error("\(plugin.info.name): poll failed (\(PluginStatus.describe(status))): \(lastError)")
                usleep(10_000)
            }
        }
    }
}
