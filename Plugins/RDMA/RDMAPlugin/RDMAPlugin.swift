import CRDMAShim
import CTransportABI
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The rdma transport: libibverbs RC queue pairs with one-sided RDMA WRITE/READ,
// upstream's descriptor (devices, per-device rkey/lkey, priority_matrix) and
// Connection handshake (local_nic_path, peer_nic_path, local_lid, local_gid,
// qp_num, reply_msg), so an official engine running RDMA can talk to it.

/// The rdma transport as the kit sees it: probe lists the usable devices, create opens them.
enum RDMATransport: TransportPlugin {
    static func probe(options json: String?) -> ProbeAnswer {
        switch Discovery.run(RDMAOptions(json: json)) {
        case .absent(let why, let fix):
            return .absent(why, hint: fix)
        case .found(let devices):
            return .ready("devices \(devices.map { "\($0.name) (port \($0.info.port), GID index \($0.gid.index))" }.joined(separator: ", "))")
        }
    }

    static func create(options json: String?, host: HostServices) throws(PluginFailure) -> RDMAInstance {
        let options = RDMAOptions(json: json)
        guard case .found(let found) = Discovery.run(options) else {
            throw PluginFailure(TE_ERR_HARDWARE_ABSENT, "rdma plugin: no usable device (run probe for the reason)")
        }
        let object = RDMAInstance(options: options, host: host)
        if let failure = object.open(found) { throw .noResources("rdma plugin: \(failure)") }
        for device in object.devices {
            let gid = GIDText.gid(device.gidBytes)
            let kind = device.discovered.gid.type == UInt32(RDMA_GID_ROCE_V2) ? "RoCE v2" : device.discovered.gid.type == UInt32(RDMA_GID_ROCE_V1) ? "RoCE v1" : "IB"
            object.log(TE_LOG_INFO, "rdma plugin: device \(device.name) port \(device.discovered.info.port), GID index \(device.discovered.gid.index) (\(kind)) \(gid), lid \(device.discovered.info.lid), MTU enum \(device.mtu), NUMA node \(device.discovered.numaNode), \(options.queuePairsPerEndpoint) QPs per endpoint, slices of \(options.sliceSize) bytes")
        }
        return object
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "rdma", version: "0.1.0", protocols: "rdma",
    capabilities: TE_CAP_MEM_HOST | TE_CAP_MEM_DEVICE | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_NEEDS_HANDSHAKE | TE_CAP_SPLITS_REQUESTS,
    allocatesMemory: true,
    probe: { PluginEntry.probe(RDMATransport.self, $0, $1, $2) },
    create: { PluginEntry.create(RDMATransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
