import CEFAShim
import CTransportABI
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The efa transport: libfabric reliable-datagram endpoints (FI_EP_RDM) with
// one-sided RMA, as the official engine's EFA transport uses them on AWS.
// The provider is `efa` unless MC_EFA_PROVIDER (or FI_PROVIDER) names
// another RDM+RMA provider, e.g. `tcp;ofi_rxm` or `shm` for machines without EFA.

/// What probe and create decide: the domains to open, or why none.
private enum Discovery {
    case found([efa_domain_info])
    case absent(reason: String, hint: String)

    static func run(_ options: EFAOptions) -> Discovery {
        let library = "libfabric \(String(cString: efa_library_version()))"
        let otherProviders = "set MC_EFA_PROVIDER to a software provider ('tcp;ofi_rxm' or 'shm') to run without EFA hardware"
        switch options.listDomains() {
        case .failure(let error):
            let hint = options.provider == "efa"
                ? "run on an instance with an EFA device and the efa kernel driver loaded, or \(otherProviders)"
                : "check that \(library) has the '\(options.provider)' provider (fi_info -l)"
            return .absent(reason: "\(library) offers no '\(options.provider)' RDM endpoint with RMA here (fi_getinfo: \(error))", hint: hint)
        case .success(let domains):
            if domains.isEmpty {
                return .absent(reason: "\(library) lists no '\(options.provider)' domains", hint: otherProviders)
            }
            let (chosen, missing) = options.choose(from: domains)
            let available = domains.map { EFAOptions.deviceName(domain: $0.domainName) }.joined(separator: ", ")
            if chosen.isEmpty {
                return .absent(reason: "device(s) \(missing.joined(separator: ", ")) not found; '\(options.provider)' offers: \(available)",
                               hint: "set device_name to one of those, or to auto-discovery")
            }
            return .found(chosen)
        }
    }
}

/// The efa transport as the kit sees it: probe lists the provider's domains, create opens them.
enum EFATransport: TransportPlugin {
    static func probe(options json: String?) -> ProbeAnswer {
        let options = EFAOptions(json: json)
        switch Discovery.run(options) {
        case .absent(let why, let fix):
            return .absent(why, hint: fix)
        case .found(let domains):
            return .ready("provider \(options.provider): devices \(domains.map { EFAOptions.deviceName(domain: $0.domainName) }.joined(separator: ","))")
        }
    }

    static func create(options json: String?, host: HostServices) throws(PluginFailure) -> EFAInstance {
        let options = EFAOptions(json: json)
        guard case .found(let domains) = Discovery.run(options) else {
            throw PluginFailure(TE_ERR_HARDWARE_ABSENT, "efa plugin: no usable device (run probe for the reason)")
        }
        let object = EFAInstance(options: options, host: host)
        if let wanted = options.devices, wanted.count > domains.count {
            object.log(TE_LOG_WARNING, "efa plugin: some requested devices are missing; using \(domains.map(\.domainName).joined(separator: ","))")
        }
        do { try object.open(domains: domains) } catch { throw .noResources("efa plugin: \(error.text)") }
        for context in object.contexts {
            let mode = context.virtualAddressing ? "virtual addresses" : "offsets"
            object.log(TE_LOG_INFO, "efa plugin: provider \(context.info.providerName), device \(context.name) (domain \(context.info.domainName), fabric \(context.info.fabricName)), mr_mode 0x\(String(context.info.mr_mode, radix: 16)) (\(mode)), max message \(context.info.max_msg_size), tx depth \(context.info.tx_size)")
        }
        return object
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "efa", version: "0.1.0", protocols: "efa",
    capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_NEEDS_HANDSHAKE | TE_CAP_SPLITS_REQUESTS,
    probe: { PluginEntry.probe(EFATransport.self, $0, $1, $2) },
    create: { PluginEntry.create(EFATransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
