/// A handle to an opened segment (0 is the local segment, as in Mooncake).
public typealias SegmentHandle = Int32

/// A batch identifier (never 0; `UInt64.max` is Mooncake's INVALID_BATCH).
public typealias BatchID = UInt64

/// One transfer request, with Mooncake's semantics: `remoteAddress` is an
/// absolute virtual address inside the target segment's process.
public struct TransferRequest: Sendable, Equatable {
    /// Direction of a transfer.
    public enum Operation: Int32, Sendable, CustomStringConvertible {
        /// Copy from the target segment into local memory.
        case read = 0
        /// Copy local memory into the target segment.
        case write = 1

        /// "read" or "write", as logs, metrics labels and benchmark results name it.
        public var description: String { self == .read ? "read" : "write" }
    }

    /// Read or write.
    public var operation: Operation
    /// Local address inside a registered local buffer.
    public var localAddress: UInt64
    /// Target segment.
    public var segment: SegmentHandle
    /// Absolute address in the target process.
    public var remoteAddress: UInt64
    /// Number of bytes.
    public var length: UInt64

    /// Creates a request.
    public init(operation: Operation, localAddress: UInt64, segment: SegmentHandle, remoteAddress: UInt64, length: UInt64) {
        self.operation = operation
        self.localAddress = localAddress
        self.segment = segment
        self.remoteAddress = remoteAddress
        self.length = length
    }
}

/// State of one task in a batch (Mooncake's TransferStatusEnum values).
public enum TransferState: Int32, Sendable, Equatable {
    /// Created, not yet submitted.
    case waiting = 0
    /// Submitted and in flight.
    case pending = 1
    /// Invalid request.
    case invalid = 2
    /// Cancelled.
    case canceled = 3
    /// All bytes moved.
    case completed = 4
    /// Did not finish in time.
    case timeout = 5
    /// Failed.
    case failed = 6
}

/// Status of one task.
public struct TransferStatus: Sendable, Equatable {
    /// Current state.
    public var state: TransferState
    /// Bytes moved so far.
    public var transferredBytes: UInt64
    /// Why it failed, when it did.
    public var error: String?

    /// Creates a status.
    public init(state: TransferState, transferredBytes: UInt64 = 0, error: String? = nil) {
        self.state = state
        self.transferredBytes = transferredBytes
        self.error = error
    }
}

/// A notification received from a peer (Mooncake `TransferNotify`).
public struct TransferNotification: Sendable, Equatable {
    /// Sender-chosen name.
    public var name: String
    /// Message text.
    public var message: String

    /// Creates a notification.
    public init(name: String, message: String) {
        self.name = name
        self.message = message
    }
}
