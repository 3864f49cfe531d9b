import CCXLShim
import FoundationEssentials

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

    private struct Raw: Decodable {
        var device_name: String?
        var options: [String: String]?
    }

    init(json: UnsafePointer<CChar>?) {
        let raw = json.flatMap { try? JSONDecoder().decode(Raw.self, from: Data(String(cString: $0).utf8)) }
        let options = raw?.options ?? [:]
        path = options["MC_CXL_DEV_PATH"].flatMap { $0.isEmpty ? nil : $0 }
        let device = raw?.device_name ?? ""
        self.device = device.isEmpty || device == "auto-discovery" ? nil : device
        size = options["MC_CXL_DEV_SIZE"].flatMap { UInt64($0) }
        flush = ["1", "true", "yes", "on"].contains((options["MC_CXL_FLUSH"] ?? "").lowercased())
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

/// The pool's allocation table, kept in the pool itself so every engine mapping it agrees:
/// the pool is cut into chunks (2 MiB, or the device-dax alignment if larger); a header chunk
/// holds one owner word per chunk, claimed and released with atomic compare-and-swap.
/// Owners are (boot-id hash << 32 | pid), so chunks of a dead local process can be reclaimed.
struct ChunkTable {
    static let magic: UInt64 = 0x3150_4C58_4345_5445  // "TECXLP1" little-endian
    static let initialising: UInt64 = 0x2D2D_2D2D_2D2D_2D2D
    let base: UnsafeMutableRawPointer
    let chunkSize: UInt64
    let chunks: Int
    let firstDataChunk: Int
    let owner: UInt64
    let bootHash: UInt64

    init?(base: UnsafeMutableRawPointer, size: UInt64, align: UInt64, bootID: String) {
        self.base = base
        chunkSize = max(2 << 20, align)
        chunks = Int(size / chunkSize)
        let headerBytes = UInt64(64 + chunks * 8)
        firstDataChunk = Int((headerBytes + chunkSize - 1) / chunkSize)
        guard chunks > firstDataChunk else { return nil }
        var hash: UInt64 = 1469598103934665603
        for byte in bootID.utf8 { hash = (hash ^ UInt64(byte)) &* 1099511628211 }
        bootHash = hash & 0x7FFF_FFFF
        owner = bootHash << 32 | UInt64(UInt32(bitPattern: getpid()))
        let header = base.assumingMemoryBound(to: UInt64.self)
        // The first engine on a fresh (or foreign) pool writes the header; the others wait for it.
        while true {
            let current = cxl_load(header)
            if current == Self.magic { break }
            if current == Self.initialising { usleep(1000); continue }
            // Fresh (or foreign) contents: whoever swaps in "initialising" writes the table.
            if cxl_cas(header, current, Self.initialising) == 1 {
                header[1] = UInt64(chunks)
                memset(base + 64, 0, chunks * 8)
                cxl_store(header, Self.magic)
                break
            }
        }
    }

    private func slot(_ index: Int) -> UnsafeMutablePointer<UInt64> {
        (base + 64).assumingMemoryBound(to: UInt64.self) + index
    }

    /// Claims a run of chunks for `length` bytes; returns the pool offset.
    func allocate(_ length: UInt64) -> UInt64? {
        let needed = Int((length + chunkSize - 1) / chunkSize)
        for attempt in 0..<2 {
            var start = firstDataChunk
            while start + needed <= chunks {
                var claimed = 0
                while claimed < needed && cxl_claim(slot(start + claimed), owner) == 1 { claimed += 1 }
                if claimed == needed { return UInt64(start) * chunkSize }
                for i in 0..<claimed { _ = cxl_release(slot(start + i), owner) }
                start += claimed + 1
            }
            if attempt == 0 && reclaimDead() == 0 { break }
        }
        return nil
    }

    func release(_ offset: UInt64, _ length: UInt64) {
        let first = Int(offset / chunkSize)
        for i in 0..<Int((length + chunkSize - 1) / chunkSize) { _ = cxl_release(slot(first + i), owner) }
    }

    /// Frees chunks held by processes of this boot that no longer exist.
    func reclaimDead() -> Int {
        var freed = 0
        for i in firstDataChunk..<chunks {
            let holder = cxl_load(slot(i))
            guard holder != 0, holder >> 32 == bootHash else { continue }
            let pid = pid_t(bitPattern: UInt32(truncatingIfNeeded: holder))
            if kill(pid, 0) != 0 && errno == ESRCH && cxl_release(slot(i), holder) == 1 { freed += 1 }
        }
        return freed
    }
}
