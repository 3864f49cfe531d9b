import CNVMeoFShim
import CTransportABI
import TransportPluginKit

/// The nvmeof transport as the kit sees it: probe opens the namespaces it would serve, create
/// opens them for good and starts the I/O threads.
enum NVMeoFTransport: TransportPlugin {
    static func probe(options json: String?) -> ProbeAnswer {
        let options: NVMeoFOptions
        do { options = try NVMeoFOptions(json: json) } catch {
            return ProbeAnswer(TE_ERR_INVALID_ARGUMENT, reason: "\(error)",
                               hint: "set MC_NVMEOF_NAMESPACES (or device_name) to paths or tcp|rdma://address:port/<NQN>")
        }
        switch Probe.run(options) {
        case .ready(let text): return .ready(text)
        case .absent(let why, let fix): return .absent(why, hint: fix)
        }
    }

    static func create(options json: String?, host: HostServices) throws(PluginFailure) -> NVMeoFInstance {
        let options: NVMeoFOptions
        do { options = try NVMeoFOptions(json: json) } catch { throw .invalid("nvmeof plugin: \(error)") }
        let storage: LocalStorage
        switch LocalStorage.open(options, log: { host.log($0, $1) }) {
        case .failure(let error): throw PluginFailure(TE_ERR_HARDWARE_ABSENT, "nvmeof plugin: \(error)")
        case .success(let opened): storage = opened
        }
        let object = NVMeoFInstance(options: options, storage: storage, host: host)
        guard object.start() else {
            object.close()
            throw .noResources("nvmeof plugin: cannot start its I/O threads")
        }
        if storage.ranges.isEmpty { host.log(TE_LOG_INFO, "nvmeof plugin: no namespaces of its own; reaches peers' namespaces directly or through their owners") }
        return object
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "nvmeof", version: "0.1.0", protocols: "nvmeof",
    capabilities: TE_CAP_MEM_HOST | TE_CAP_MEM_STORAGE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
    probe: { PluginEntry.probe(NVMeoFTransport.self, $0, $1, $2) },
    create: { PluginEntry.create(NVMeoFTransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
