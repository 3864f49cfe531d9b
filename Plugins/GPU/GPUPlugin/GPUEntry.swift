import CGPUShim
import CTransportABI
import TransportPluginKit

/// The GPU transports as the kit sees them: probe and create.
enum GPUTransport: TransportPlugin {
    static func probe(options: String?) -> ProbeAnswer {
        do { return Probe.run(try GPUOptions(json: options)) } catch {
            return ProbeAnswer(TE_ERR_INVALID_ARGUMENT, reason: "\(error)", hint: "device_name is cuda:N or hip:N")
        }
    }

    static func create(options: String?, host: HostServices) throws(PluginFailure) -> GPUInstance {
        let parsed: GPUOptions
        do { parsed = try GPUOptions(json: options) } catch { throw .invalid("\(error)") }
        let probed = Probe.run(parsed)
        guard probed.status == TE_OK else { throw PluginFailure(probed.status, "gpu plugin: \(probed.reason)") }
        let object = GPUInstance(options: parsed, host: host)
        guard object.start() else {
            object.close()
            throw .noResources("gpu plugin: cannot start its copy threads")
        }
        return object
    }
}

extension GPUOptions {
    /// Options from create's JSON (nil: the defaults).
    init(json: String?) throws {
        if let json { try self.init(json: json) } else { self.init() }
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "gpu", version: "0.1.0", protocols: "nvlink,nvlink_intra,hip",
    capabilities: TE_CAP_MEM_DEVICE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS, allocatesMemory: true,
    probe: { PluginEntry.probe(GPUTransport.self, $0, $1, $2) },
    create: { PluginEntry.create(GPUTransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
