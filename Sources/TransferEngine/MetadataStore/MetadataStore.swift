/// A key-value service holding segment descriptors and RPC addresses
/// (etcd, redis or an HTTP metadata server), as the official engine uses them.
protocol MetadataStore: Sendable {
    /// A description of the server for messages ("redis 127.0.0.1:6379").
    var serverDescription: String { get }
    /// The value of `key`, or nil when absent.
    func get(_ key: String) throws -> String?
    /// Stores `value` under `key`; `ttlSeconds` (when the backend supports it) makes it expire unless refreshed.
    func put(_ key: String, _ value: String, ttlSeconds: Int?) throws
    /// Deletes `key` (absent is not an error).
    func delete(_ key: String) throws
}

/// The official key layout: `mooncake/[<MC_METADATA_CLUSTER_ID>/]ram/<segment>` and
/// `mooncake/[<cluster>/]rpc_meta/<segment>`; a segment name containing '/' is used as is.
struct MetadataKeys: Sendable {
    let prefix: String

    init(environment: [String: String]) {
        var cluster = environment["MC_METADATA_CLUSTER_ID"] ?? ""
        if !cluster.isEmpty, !cluster.hasSuffix("/") { cluster += "/" }
        prefix = "mooncake/" + cluster
    }

    func segment(_ name: String) -> String { name.contains("/") ? prefix + name : prefix + "ram/" + name }
    func rpcMeta(_ name: String) -> String { prefix + "rpc_meta/" + name }
}

/// A metadata operation that failed, naming the server and the key.
struct MetadataFailure: Error, CustomStringConvertible {
    var server: String
    var operation: String
    var key: String
    var reason: String
    var description: String { "metadata \(operation) of '\(key)' on \(server) failed: \(reason)" }
}

extension MetadataStore {
    /// Runs one operation, turning transport errors into a failure that names the server and the key.
    func attempt<R>(_ operation: String, _ key: String, _ body: () throws -> R) throws -> R {
        do { return try body() } catch let error as MetadataFailure {
            throw error
        } catch let error as MetadataRejection {
            throw error
        } catch {
            throw MetadataFailure(server: serverDescription, operation: operation, key: key, reason: "\(error)")
        }
    }
}

/// Runs `body`, retrying transient failures with exponential backoff until `budgetMs` is spent.
func withRetries<R>(budgetMs: Int, _ body: () throws -> R) throws -> R {
    let deadline = MonotonicClock.nanoseconds() + UInt64(budgetMs) * 1_000_000
    var delayMs = 50
    while true {
        do { return try body() } catch {
            if error is MetadataRejection || MonotonicClock.nanoseconds() + UInt64(delayMs) * 1_000_000 > deadline { throw error }
            usleep(UInt32(delayMs * 1000))
            delayMs = min(delayMs * 2, 1000)
        }
    }
}

/// A definitive answer from the server (e.g. HTTP 400) that retrying cannot change.
struct MetadataRejection: Error, CustomStringConvertible {
    var description: String
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
