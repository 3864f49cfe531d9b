import CCXLShim
import CTransportABI
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The cxl transport as the kit sees it: probe finds the pool, create maps it.
enum CXLTransport: TransportPlugin {
    static func probe(options: String?) -> ProbeAnswer {
        switch PoolDiscovery.run(CXLOptions(json: options)) {
        case .absent(let why, let fix):
            return .absent(why, hint: fix)
        case .found(let path, let size, let align, let dax):
            return .ready("pool \(path) (\(size) bytes, \(align)-byte alignment\(dax.map { ", device-dax \($0)" } ?? ", file"))")
        }
    }

    static func create(options json: String?, host: HostServices) throws(PluginFailure) -> CXLInstance {
        let options = CXLOptions(json: json)
        let path: String, size: UInt64, align: UInt64, dax: String?
        switch PoolDiscovery.run(options) {
        case .absent(let why, _): throw PluginFailure(TE_ERR_HARDWARE_ABSENT, "cxl plugin: \(why)")
        case .found(let found, let foundSize, let foundAlign, let foundDax): (path, size, align, dax) = (found, foundSize, foundAlign, foundDax)
        }
        var fd: Int32 = -1
        var base: UnsafeMutableRawPointer?
        let status = cxl_map(path, size, align, &fd, &base)
        guard status == 0, let base else { throw .noResources("cxl plugin: cannot map \(path): \(String(cString: strerror(-status)))") }
        var identity = [CChar](repeating: 0, count: 128)
        _ = cxl_file_identity(fd, &identity, identity.count)
        let id = String(decoding: identity.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // A device-dax pool is named by its device; a file pool only exists on this host.
        let poolID = dax.map { "dax:\($0):\(size)" } ?? "\(bootID):\(id):\(size)"
        let table: PoolTable
        switch PoolTable.open(base: base, fd: fd, size: size, align: align, bootID: bootID, path: path, isDevice: dax != nil) {
        case .success(let opened): table = opened
        case .failure(let error):
            cxl_unmap(fd, base, size)
            throw .noResources("cxl plugin: \(error.reason)")
        }
        let object = CXLInstance(path: path, base: UInt64(UInt(bitPattern: base)), size: size, fd: fd, poolID: poolID, flush: options.flush,
                                 table: table, host: host)
        object.log(TE_LOG_INFO, "cxl plugin: pool \(path), \(size) bytes mapped at 0x\(String(object.base, radix: 16)) (\(align)-byte alignment), flush \(options.flush ? "on" : "off"), engine slot \(table.slot)")
        return object
    }
}

nonisolated(unsafe) private let descriptor = PluginDescriptor.make(
    name: "cxl", version: "0.1.0", protocols: "cxl",
    capabilities: TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS, allocatesMemory: true,
    probe: { PluginEntry.probe(CXLTransport.self, $0, $1, $2) },
    create: { PluginEntry.create(CXLTransport.self, $0, $1, $2) })

/// The plugin's entry point (TE_PLUGIN_ENTRY_SYMBOL).
@_cdecl("te_transport_plugin_entry")
public func te_transport_plugin_entry() -> UnsafePointer<te_plugin_descriptor> { descriptor }
