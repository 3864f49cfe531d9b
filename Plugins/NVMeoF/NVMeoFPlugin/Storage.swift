import CNVMeoFShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Boot id of this host: a file path only means the same file on the same boot.
let bootID = BootID.current

/// Where storage ranges live in a segment's address space. Far above any user
/// address (user space ends below 2^57), so they never overlap registered memory.
let storageBase: UInt64 = 1 << 62

/// What a segment publishes for one namespace it serves (a `buffers` entry).
struct PublishedNamespace: Codable {
    struct Subsystem: Codable {
        var trtype: String
        var traddr: String
        var trsvcid: String
        var nqn: String
        var nsid: UInt32
        var wwid: String
    }

    var name: String
    var addr: UInt64
    var length: UInt64
    var `protocol`: String
    /// The owner's path (upstream's `file_path`).
    var file_path: String
    /// Upstream's map of host name to the path that host sees the namespace at.
    var local_path_map: [String: String]
    /// "b:<major>:<minor>" or "f:<dev>:<ino>": proves a same-host path is the same file.
    var nvmeof_identity: String
    var nvmeof_boot_id: String
    /// How another host reaches the namespace directly (when it came over a fabric).
    var nvmeof_subsystem: Subsystem?
}

/// The namespaces this engine serves, laid end to end from `storageBase`.
final class LocalStorage: @unchecked Sendable {
    struct Range {
        var namespace: Namespace
        var address: UInt64
        var published: PublishedNamespace
    }

    private(set) var ranges: [Range] = []
    /// Controllers this engine connected (disconnected at close).
    private var connections: [OpaquePointer] = []

    /// Opens (connecting where needed) every configured source.
    static func open(_ options: NVMeoFOptions, log: (Int32, String) -> Void) -> Result<LocalStorage, OptionError> {
        let storage = LocalStorage()
        var next = storageBase
        func add(_ path: String, subsystem: PublishedNamespace.Subsystem?) -> OptionError? {
            switch Namespace.open(path, direct: options.oDirect) {
            case .failure(let error): return error
            case .success(let namespace):
                let entry = PublishedNamespace(
                    name: "nvmeof", addr: next, length: namespace.size, protocol: "nvmeof", file_path: path,
                    local_path_map: options.hostname.isEmpty ? [:] : [options.hostname: path],
                    nvmeof_identity: namespace.identity, nvmeof_boot_id: bootID, nvmeof_subsystem: subsystem)
                storage.ranges.append(Range(namespace: namespace, address: next, published: entry))
                log(TE_LOG_INFO, "nvmeof: serving \(path) (\(namespace.size) bytes, \(namespace.block == 1 ? "buffered" : "O_DIRECT, \(namespace.block)-byte blocks")) at 0x\(String(next, radix: 16))")
                next += namespace.size
                return nil
            }
        }
        func attach(_ target: FabricTarget) -> OptionError? {
            switch storage.connect(target, log: log) {
            case .failure(let error): return error
            case .success(let entries):
                for entry in entries {
                    let subsystem = PublishedNamespace.Subsystem(trtype: target.trtype, traddr: target.traddr, trsvcid: target.trsvcid,
                                                                 nqn: target.nqn, nsid: entry.nsid, wwid: entry.wwid)
                    if let error = add("/dev/\(entry.device)", subsystem: subsystem) { return error }
                }
                return nil
            }
        }
        for source in options.sources {
            let error: OptionError?
            switch source {
            case .path(let path): error = add(path, subsystem: nil)
            case .fabric(let target): error = attach(target)
            }
            if let error {
                storage.close()
                return .failure(error)
            }
        }
        for controller in options.discovery {
            switch Discovery.subsystems(at: controller) {
            case .failure(let error):
                storage.close()
                return .failure(error)
            case .success(let targets):
                for target in targets {
                    if let error = attach(target) {
                        storage.close()
                        return .failure(error)
                    }
                }
            }
        }
        return .success(storage)
    }

    /// Connects to a subsystem (unless the kernel already is) and returns its namespaces.
    func connect(_ target: FabricTarget, log: (Int32, String) -> Void) -> Result<[SubsystemTable.Entry], OptionError> {
        if SubsystemTable.namespaces(of: target.nqn).isEmpty {
            var connection: OpaquePointer?
            var name = [CChar](repeating: 0, count: 64)
            var error = [CChar](repeating: 0, count: 256)
            let status = nvmeof_connect(target.trtype, target.traddr, target.trsvcid, target.hostTraddr, target.nqn,
                                        &connection, &name, name.count, &error, error.count)
            guard status == 0 else { return .failure(OptionError("\(target.uri): \(cString(error))")) }
            if let connection {
                connections.append(connection)
                log(TE_LOG_INFO, "nvmeof: connected \(target.uri) as \(cString(name))")
            }
        }
        let entries = SubsystemTable.waitForNamespaces(of: target.nqn, nsid: target.nsid, milliseconds: 10_000)
        guard !entries.isEmpty else {
            return .failure(OptionError("\(target.uri): connected, but no namespace\(target.nsid.map { " \($0)" } ?? "") appeared under /dev"))
        }
        return .success(entries)
    }

    /// The range holding [address, address+length), if one does.
    func range(containing address: UInt64, _ length: UInt64) -> Range? {
        ranges.first { address >= $0.address && address - $0.address <= $0.namespace.size && length <= $0.namespace.size - (address - $0.address) }
    }

    /// Disconnects the controllers this engine connected.
    func close() {
        ranges.removeAll()
        for connection in connections { _ = nvmeof_disconnect(connection) }
        connections.removeAll()
    }
}

/// Discovery log pages through libnvme.
enum Discovery {
    /// The NVM subsystems the discovery controller at `controller` lists.
    static func subsystems(at controller: FabricTarget) -> Result<[FabricTarget], OptionError> {
        var entries = [nvmeof_disc_entry](repeating: nvmeof_disc_entry(), count: 64)
        var error = [CChar](repeating: 0, count: 256)
        let count = nvmeof_discover(controller.trtype, controller.traddr, controller.trsvcid, controller.hostTraddr,
                                    &entries, entries.count, &error, error.count)
        guard count >= 0 else { return .failure(OptionError("no NVMe-oF discovery controller answers at \(controller.trtype) \(controller.traddr):\(controller.trsvcid) (\(cString(error)))")) }
        func text<T>(_ field: T) -> String {
            withUnsafeBytes(of: field) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        }
        return .success(entries.prefix(Int(count)).filter { $0.subtype == 2 }.map { entry in
            FabricTarget(trtype: text(entry.trtype), traddr: text(entry.traddr), trsvcid: text(entry.trsvcid),
                         nqn: text(entry.subnqn), nsid: nil, hostTraddr: controller.hostTraddr)
        })
    }
}
