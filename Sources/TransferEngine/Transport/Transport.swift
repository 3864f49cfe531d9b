/// A way to move bytes between this engine and its peers: the built-in TCP transport and every
/// loaded plugin implement it, and the engine reaches each of them only through it. Routing,
/// failover and completion handling live in the engine, once.
protocol Transport: AnyObject, Sendable {
    /// The protocol name peers see in descriptors ("tcp", "rdma", ...).
    var protocolName: String { get }
    /// Whether it moves accelerator memory (GPU, NPU); TCP does not.
    var movesDeviceMemory: Bool { get }
    /// Whether it cuts large requests itself (the engine then hands it whole requests).
    var splitsRequests: Bool { get }

    /// Makes [address, address+length) reachable; returns keys for the buffer's descriptor entry.
    func register(address: UInt64, length: UInt64, location: String) throws -> [String: JSONValue]
    /// Undoes `register`.
    func unregister(address: UInt64) throws
    /// Memory the transport provides itself (a CXL pool, device memory), or nil when it has none.
    func allocate(length: UInt64, location: String) throws -> UInt64?
    /// Returns memory from `allocate`.
    func free(address: UInt64) throws
    /// Keys this transport adds to the published segment descriptor.
    func localDescriptorFragment() throws -> [String: JSONValue]
    /// Prepares to move data to a peer. `view` is the peer's descriptor as this transport reads it;
    /// `host` is where the peer's listeners are.
    func connect(segment: String, view: SegmentDescriptor, host: String) throws -> any TransportPeer
    /// Answers a connection handshake that a peer sent to this transport; nil refuses it.
    func handleHandshake(_ request: String) -> String?
    /// Ends every request in flight (with an error) and releases the transport.
    func shutdown()
}

/// One transport's link to one peer segment.
protocol TransportPeer: AnyObject, Sendable {
    /// Queues slices; each ends through its token. Never blocks on I/O.
    func submit(_ slices: [TransferSlice])
    /// Runs one request on the calling thread until it ends or `deadline` (monotonic ns)
    /// passes; nil when this transport runs a request of this size better through `submit`.
    func transferSync(_ operation: TransferRequest.Operation, localAddress: UInt64, remoteAddress: UInt64, length: UInt64,
                      deadline: UInt64) -> SyncOutcome?
    /// Forgets the peer; requests still queued end with an error.
    func close()
}

/// How a synchronous request on one path ended.
enum SyncOutcome: Equatable {
    /// Every byte moved.
    case completed
    /// The path failed; the text says why.
    case failed(String)
    /// The peer refused this request (its range, its memory): another path would be refused
    /// too, or worse, get past the refusal; the path itself is fine.
    case rejected(String)
    /// The deadline passed first.
    case timedOut
}

/// One piece of a request as every transport carries it.
struct TransferSlice: @unchecked Sendable {
    var operation: TransferRequest.Operation
    var localAddress: UInt64
    var remoteAddress: UInt64
    var length: UInt64
    /// Where its end is reported.
    var token: CompletionToken
    /// Monotonic ns by which its request must end (0: none). A transport that can bound its I/O
    /// stops there, so nothing of a timed-out request lands later.
    var deadline: UInt64 = 0
}

/// Where a slice's end goes: its batch task, straight or through the failover that resubmits a
/// failed slice on the next path. One reference and an index: slices are copied several times
/// on their way, and each reference copied is a retain and a release.
struct CompletionToken: @unchecked Sendable {
    /// The batch itself (a request with one path), or the failover of the request's remaining paths.
    enum Sink {
        case batch(Batch)
        case failover(Failover)
    }

    let sink: Sink
    /// The task's index in the batch.
    let task: Int

    /// A token that reports straight to the batch.
    init(batch: Batch, task: Int) {
        sink = .batch(batch)
        self.task = task
    }

    /// A token whose failures go to `failover`.
    init(failover: Failover, task: Int) {
        sink = .failover(failover)
        self.task = task
    }

    /// The batch that owns the task.
    var batch: Batch {
        switch sink {
        case .batch(let batch): return batch
        case .failover(let failover): return failover.batch
        }
    }

    /// Reports one slice's end; a path failure goes to the failover when there is one. A request
    /// the peer refused, or whose deadline passed (`rejected`), ends its task: it must not get
    /// past the refusal elsewhere, and a path is not to blame for a deadline.
    func finish(_ slice: TransferSlice, on protocolName: String, error: String?, rejected: Bool = false) {
        switch sink {
        case .batch(let batch):
            batch.sliceFinished(task: task, bytes: error == nil ? slice.length : 0, error: error)
        case .failover(let failover):
            if let error, rejected {
                failover.batch.sliceFinished(task: task, bytes: 0, error: error)
            } else if let error {
                failover.sliceFailed(slice, task: task, on: protocolName, reason: error)
            } else {
                failover.batch.sliceFinished(task: task, bytes: slice.length, error: nil)
            }
        }
    }
}
