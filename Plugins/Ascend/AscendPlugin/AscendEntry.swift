import CAscendShim
import CTransportABI
import AscendRankInfo
import TransportPluginKit

/// The ascend transport as the kit sees it: probe and create.
enum AscendTransport: TransportPlugin {
    static func probe(options: String?) -> ProbeAnswer {
        do { return Probe.run(try AscendOptions(json: options)) } catch {
            return ProbeAnswer(error.status, reason: error.message, hint: "device_name is npu:N or N")
        }
    }

    static func create(options: String?, host: HostServices) throws(PluginFailure) -> AscendInstance {
        let parsed = try AscendOptions(json: options)
        let probed = Probe.run(parsed)
        guard probed.status == TE_OK else { throw PluginFailure(probed.status, "ascend plugin: \(probed.reason)") }
        return try AscendInstance(options: parsed, host: host)
    }
}

/// Whether CANN and the NPU asked for are here, and why not.
enum Probe {
    static func run(_ options: AscendOptions) -> ProbeAnswer {
        var error = [CChar](repeating: 0, count: 512)
        let loaded = ascend_load(options.hixlLibrary, options.aclLibrary, &error, error.count)
        let text = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        switch loaded {
        case 0: break
        case -1: return ProbeAnswer(TE_ERR_LIBRARY_MISSING, reason: "CANN is not installed (\(text))",
                                    hint: "install the CANN toolkit 8.5.0 or newer with HIXL and source its set_env.sh (libascendcl.so, libcann_hixl.so), or set MC_ASCEND_LIBRARY and MC_ASCEND_ACL_LIBRARY")
        case -2: return ProbeAnswer(TE_ERR_LIBRARY_MISSING, reason: text, hint: "install the CANN toolkit 8.5.0 or newer with HIXL")
        default: return .absent("the ACL runtime did not start (\(text))", hint: "check npu-smi info and the Ascend driver")
        }
        var count: UInt32 = 0
        let counted = ascend_device_count(&count)
        guard counted == 0, count > 0 else {
            return .absent("no NPU (\(counted == 0 ? "aclrtGetDeviceCount found 0" : cannFailure("aclrtGetDeviceCount", counted)))",
                           hint: "check npu-smi info and the Ascend driver")
        }
        guard UInt32(options.device) < count else {
            return .absent("npu:\(options.device) does not exist (\(count) NPU(s))", hint: "set device_name to npu:N with N below the device count")
        }
        return .ready("\(count) NPU(s), using npu:\(options.device)")
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "ascend", version: "0.1.0", protocols: "ascend",
    capabilities: TE_CAP_MEM_DEVICE | TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS, allocatesMemory: true,
    probe: { PluginEntry.probe(AscendTransport.self, $0, $1, $2) },
    create: { PluginEntry.create(AscendTransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
