import CCXLShim
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Settings from create/probe's options.
struct CXLOptions {
    /// `MC_CXL_DEV_PATH` (as upstream): the pool, a device-dax node (/dev/dax0.0) or, for tests, a file.
    var path: String?
    /// `device_name`: a dax device name (dax0.0) when no path is given; empty or auto-discovery: the first one.
    var device: String?
    /// `MC_CXL_DEV_SIZE`: bytes of a file pool to use (default: the file's size).
    var size: UInt64?
    /// `MC_CXL_FLUSH=1`: write back / drop cache lines around copies, for pools shared without hardware coherence.
    var flush: Bool

    init(json: String?) {
        let raw = CreateOptions(json: json)
        path = raw.setting("MC_CXL_DEV_PATH")
        device = raw.deviceName.isEmpty || raw.deviceName == "auto-discovery" ? nil : raw.deviceName
        size = raw.setting("MC_CXL_DEV_SIZE").flatMap { UInt64($0) }
        flush = raw.flag("MC_CXL_FLUSH")
    }
}

/// Where the pool is and how big, or why there is none.
enum PoolDiscovery {
    case found(path: String, size: UInt64, align: UInt64, dax: String?)
    case absent(reason: String, hint: String)

    static func sysfsNumber(_ path: String) -> UInt64? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 64)
        guard fgets(&buffer, 64, file) != nil else { return nil }
        let text = String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }

    static func run(_ options: CXLOptions) -> PoolDiscovery {
        let twoMiB: UInt64 = 2 << 20
        if let path = options.path ?? options.device.map({ "/dev/\($0)" }) {
            var info = stat()
            guard stat(path, &info) == 0 else {
                return .absent(reason: "\(path): \(String(cString: strerror(errno)))",
                               hint: "set MC_CXL_DEV_PATH to a device-dax node (/dev/daxX.Y) or a pool file")
            }
            if info.st_mode & S_IFMT == S_IFCHR {
                let name = String(path.split(separator: "/").last ?? "")
                guard let size = sysfsNumber("/sys/bus/dax/devices/\(name)/size"), size > 0 else {
                    return .absent(reason: "\(path) is not a device-dax device (no /sys/bus/dax/devices/\(name)/size)", hint: "")
                }
                return .found(path: path, size: size, align: sysfsNumber("/sys/bus/dax/devices/\(name)/align") ?? twoMiB, dax: name)
            }
            let size = options.size ?? UInt64(max(0, info.st_size))
            guard size >= 4096, size <= UInt64(max(0, info.st_size)) else {
                return .absent(reason: "\(path) has \(info.st_size) bytes; MC_CXL_DEV_SIZE=\(options.size.map(String.init) ?? "-") does not fit", hint: "size the pool file first (truncate -s)")
            }
            return .found(path: path, size: size, align: 4096, dax: nil)
        }
        var entries = [cxl_dax_info](repeating: cxl_dax_info(), count: 16)
        let count = entries.withUnsafeMutableBufferPointer { cxl_list_dax($0.baseAddress, $0.count) }
        if count > 0, let first = entries.prefix(Int(min(count, 16))).first(where: { $0.enabled != 0 && $0.size > 0 }) {
            let name = withUnsafeBytes(of: first.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            return .found(path: "/dev/\(name)", size: first.size, align: max(first.align, 4096), dax: name)
        }
        var names = [CChar](repeating: 0, count: 256)
        let memdevs = cxl_list_memdevs(&names, names.count)
        let memdevText = memdevs > 0
            ? "libcxl sees \(memdevs) CXL memory device(s) (\(String(decoding: names.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))) but no device-dax region on them"
            : "libcxl sees no CXL memory devices"
        return .absent(reason: "no device-dax pool (libdaxctl lists \(max(count, 0)) dax devices); \(memdevText)",
                       hint: memdevs > 0 ? "create a region and a devdax namespace: cxl create-region ...; ndctl create-namespace -m devdax -r regionN"
                                         : "attach CXL memory, or set MC_CXL_DEV_PATH to a pool file to share memory between local processes")
    }
}
