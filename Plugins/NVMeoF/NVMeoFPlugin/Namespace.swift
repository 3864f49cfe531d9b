import TransportPluginKit
import CNVMeoFShim
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An open namespace (or file) and how to do aligned I/O on it.
final class Namespace: @unchecked Sendable {
    let path: String
    let fd: Int32
    let size: UInt64
    /// Alignment O_DIRECT needs (offset, length and memory); 1 without O_DIRECT.
    let block: UInt64
    let identity: String
    /// Serialises read-modify-write of partial blocks, so two unaligned writes into one block keep both.
    private let edges = Signal()
    /// I/O this engine did on the namespace for its requests: the `stats` figures (named like the
    /// block device, nvme1n1, or the file).
    let counters: DeviceCounters

    init(path: String, fd: Int32, size: UInt64, block: UInt64, identity: String) {
        counters = DeviceCounters(name: path.split(separator: "/").last.map(String.init) ?? path)
        self.path = path
        self.fd = fd
        self.size = size
        self.block = block
        self.identity = identity
    }

    deinit { close(fd) }

    /// Opens `path` for I/O (O_DIRECT when asked and the file system allows it).
    static func open(_ path: String, direct: Bool) -> Result<Namespace, OptionError> {
        var size: UInt64 = 0
        var block: UInt32 = 1
        var isDirect: Int32 = 0
        var identity = [CChar](repeating: 0, count: 64)
        let fd = nvmeof_open(path, direct ? 1 : 0, &size, &block, &isDirect, &identity, identity.count)
        guard fd >= 0 else { return .failure(OptionError("\(path): \(String(cString: strerror(-fd)))")) }
        guard size > 0 else {
            close(fd)
            return .failure(OptionError("\(path) is empty"))
        }
        return .success(Namespace(path: path, fd: fd, size: size, block: UInt64(block), identity: cString(identity)))
    }

    /// Reads or writes `length` bytes at `offset` from/to `memory`; partial blocks go through an aligned bounce buffer.
    func transfer(write: Bool, memory: UnsafeMutableRawPointer, length: UInt64, offset: UInt64) -> Int32 {
        let aligned = block == 1 || (offset % block == 0 && length % block == 0 && UInt64(UInt(bitPattern: memory)) % block == 0)
        if aligned {
            return write ? nvmeof_pwrite_full(fd, memory, length, offset) : nvmeof_pread_full(fd, memory, length, offset)
        }
        let start = offset / block * block
        let end = (offset + length + block - 1) / block * block
        let span = end - start
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, Int(max(block, 4096)), Int(span)) == 0, let bounce = raw else { return -ENOMEM }
        defer { free(bounce) }
        let inside = bounce + Int(offset - start)
        if !write {
            let status = nvmeof_pread_full(fd, bounce, span, start)
            if status == 0 { memory.copyMemory(from: inside, byteCount: Int(length)) }
            return status
        }
        return edges.locked {
            // Keep the bytes of the first and last block that lie outside the request.
            if offset != start {
                let status = nvmeof_pread_full(fd, bounce, block, start)
                if status != 0 { return status }
            }
            if (offset + length) % block != 0 && (end - block > start || offset == start) {
                let status = nvmeof_pread_full(fd, bounce + Int(span - block), block, end - block)
                if status != 0 { return status }
            }
            inside.copyMemory(from: memory, byteCount: Int(length))
            return nvmeof_pwrite_full(fd, bounce, span, start)
        }
    }
}

/// A C string from a fixed buffer.
func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Names in a directory.
func directoryEntries(_ path: String) -> [String] {
    guard let dir = opendir(path) else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

/// The kernel's view of connected NVMe subsystems (sysfs).
enum SubsystemTable {
    /// A namespace block device of a connected subsystem.
    struct Entry: Equatable {
        var device: String  // "nvme0n1"
        var nsid: UInt32
        var wwid: String
    }

    /// Whether `name` is a namespace block device name (nvme<N>n<M>, not the hidden nvme<N>c<C>n<M> paths).
    static func isNamespace(_ name: String) -> Bool {
        guard name.hasPrefix("nvme") else { return false }
        let parts = name.dropFirst(4).split(separator: "n", omittingEmptySubsequences: false)
        return parts.count == 2 && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy(\.isNumber) }
    }

    /// Namespaces of the subsystem `nqn` this host is connected to (native multipath or not).
    static func namespaces(of nqn: String) -> [Entry] {
        var devices: [String] = []
        for subsystem in directoryEntries("/sys/class/nvme-subsystem") {
            let dir = "/sys/class/nvme-subsystem/\(subsystem)"
            guard BootID.read("\(dir)/subsysnqn") == nqn else { continue }
            devices += directoryEntries(dir).filter(isNamespace)
        }
        for controller in directoryEntries("/sys/class/nvme") {
            let dir = "/sys/class/nvme/\(controller)"
            guard BootID.read("\(dir)/subsysnqn") == nqn else { continue }
            devices += directoryEntries(dir).filter(isNamespace)
        }
        var seen = Set<String>()
        return devices.filter { seen.insert($0).inserted }.compactMap { device in
            guard let nsid = BootID.read("/sys/block/\(device)/nsid").flatMap({ UInt32($0) }) else { return nil }
            return Entry(device: device, nsid: nsid, wwid: BootID.read("/sys/block/\(device)/wwid") ?? "")
        }.sorted { $0.nsid < $1.nsid }
    }

    /// Waits up to `milliseconds` for the subsystem's namespaces to appear as block devices.
    static func waitForNamespaces(of nqn: String, nsid: UInt32?, milliseconds: Int) -> [Entry] {
        let deadline = monotonicNanoseconds() + UInt64(milliseconds) * 1_000_000
        while true {
            let found = namespaces(of: nqn).filter { entry in
                (nsid == nil || entry.nsid == nsid) && access("/dev/\(entry.device)", R_OK | W_OK) == 0
            }
            if !found.isEmpty || monotonicNanoseconds() > deadline { return found }
            usleep(50_000)
        }
    }
}
