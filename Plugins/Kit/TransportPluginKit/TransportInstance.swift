import CTransportABI

/// A transport plugin, as the kit sees it: how to probe and how to create an instance. The kit
/// turns it into the C descriptor (`PluginDescriptor`).
public protocol TransportPlugin {
    /// The instance type `create` makes.
    associatedtype Instance: TransportInstance

    /// Whether the plugin can run here (`options`: the JSON create gets, or nil).
    static func probe(options: String?) -> ProbeAnswer

    /// Creates an instance; `host` stays valid until the instance is closed.
    static func create(options: String?, host: HostServices) throws(PluginFailure) -> Instance
}

/// One plugin instance in plain Swift. The kit's C entries check the pointers and sizes the host
/// passes, convert strings, write `te_buffer` answers (undoing a registration whose answer did
/// not fit, since the host then asks again) and keep each thread's last error.
/// Every method but `close` may be called from several threads at once.
public protocol TransportInstance: AnyObject {
    /// A JSON object merged into the local segment descriptor.
    func localDescriptor() throws(PluginFailure) -> String

    /// Registers `[address, address + length)` (length > 0); returns the JSON fragment for its
    /// buffer entry.
    func register(address: UInt64, length: UInt64, location: String) throws(PluginFailure) -> String

    /// Unregisters the buffer that starts at `address`: no peer reaches it afterwards.
    func unregister(address: UInt64) throws(PluginFailure)

    /// `register` answered `fragment`, which did not fit the host's buffer; the host registers
    /// `address` again with a larger one. Undo what that register did (default: `unregister`).
    func registrationNotDelivered(address: UInt64, fragment: String)

    /// Prepares to talk to a peer from its segment descriptor; returns a nonzero handle.
    func openPeer(segment: String, descriptor: String) throws(PluginFailure) -> UInt64

    /// Forgets a peer handle.
    func closePeer(_ handle: UInt64)

    /// Answers a handshake a peer sent to this host's port (JSON in, JSON out).
    func answerHandshake(_ request: String) throws(PluginFailure) -> String

    /// Queues requests without blocking; `accepted` counts those queued, also when it throws
    /// (the earlier ones stay queued and complete).
    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure)

    /// Stores up to `out.capacity` finished requests and returns how many, waiting at most
    /// `timeout` nanoseconds for the first.
    func poll(into out: CompletionArray, timeout: UInt64) throws(PluginFailure) -> Int

    /// Allocates memory this transport serves (managed buffers); not offered by default.
    func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64

    /// Returns memory from `allocate`.
    func free(address: UInt64) throws(PluginFailure)

    /// Figures per device as the ABI's `stats` JSON ({"devices":[{"name", "bytes_read",
    /// "bytes_written", "inflight_bytes", "errors"}]}), or nil when the instance keeps none.
    func stats() throws(PluginFailure) -> String?

    /// Stops the instance's threads and releases what it holds; no call follows.
    func close()
}

extension TransportInstance {
    public func registrationNotDelivered(address: UInt64, fragment: String) { try? unregister(address: address) }

    /// Plugins that need no handshake of their own answer with an empty reply message.
    public func answerHandshake(_ request: String) throws(PluginFailure) -> String { "{\"reply_msg\":\"\"}" }

    public func allocate(length: UInt64, location: String) throws(PluginFailure) -> UInt64 {
        throw .notSupported("this transport allocates no memory of its own")
    }

    public func stats() throws(PluginFailure) -> String? { nil }

    public func free(address: UInt64) throws(PluginFailure) {
        throw .invalid("0x\(String(address, radix: 16)) was not allocated by this transport")
    }
}

/// The requests of one submit call, read in place (the host's array, with its stride).
@frozen
public struct RequestArray: RandomAccessCollection {
    @usableFromInline let base: UnsafeRawPointer?
    @usableFromInline let stride: Int
    /// How many requests there are.
    public let count: Int

    @inlinable
    init(base: UnsafeRawPointer?, count: Int, stride: Int) {
        self.base = base
        self.count = count
        self.stride = stride
    }

    @inlinable public var startIndex: Int { 0 }
    @inlinable public var endIndex: Int { count }

    /// The request at `index` (0 ..< count).
    @inlinable
    public subscript(index: Int) -> te_request {
        precondition(index >= 0 && index < count)
        return base!.loadUnaligned(fromByteOffset: index * stride, as: te_request.self)
    }
}

/// Where poll stores completions: the host's array, with its stride.
@frozen
public struct CompletionArray {
    @usableFromInline let base: UnsafeMutableRawPointer?
    @usableFromInline let stride: Int
    /// How many completions fit.
    public let capacity: Int

    @inlinable
    init(base: UnsafeMutableRawPointer?, capacity: Int, stride: Int) {
        self.base = base
        self.capacity = capacity
        self.stride = stride
    }

    /// Stores `completion` at `index` (0 ..< capacity).
    @inlinable
    public func store(_ completion: te_completion, at index: Int) {
        precondition(index >= 0 && index < capacity)
        base!.storeBytes(of: completion, toByteOffset: index * stride, as: te_completion.self)
    }
}
