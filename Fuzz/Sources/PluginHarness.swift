import CTransportABI
import Foundation
@testable import TransferEngine

#if canImport(Glibc)
import Glibc
#endif

/// Drives one transport plugin (`libtransport_<name>.so` from TE_FUZZ_PLUGIN_DIR, built with the
/// same sanitizers) through its C vtable as a host would, with hostile input: every input is
/// offered as a peer's handshake request (`on_handshake`) and, where opening a peer stays on this
/// machine, as a peer's segment descriptor (`open_peer`); a descriptor the plugin accepts gets
/// requests aimed at and just past its buffers' edges. `@key@` in an input is replaced by the
/// value of `key` in the instance's own descriptor (seeds use it to name the right pool).
final class PluginHarness: @unchecked Sendable {
    /// The plugin TE_FUZZ_TARGET names (`plugin-cxl`), or why it cannot run here.
    static let shared: Result<PluginHarness, PluginHarnessUnavailable> = {
        let name = String(ProcessInfo.processInfo.environment["TE_FUZZ_TARGET", default: ""].dropFirst("plugin-".count))
        return Result { try PluginHarness(name: name) }.mapError { $0 as? PluginHarnessUnavailable ?? .init(reason: "\($0)") }
    }()

    let name: String
    let vtable: te_plugin_descriptor
    let instance: OpaquePointer
    let local = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    var placeholders: [String: String] = [:]
    /// open_peer (and requests) only where they touch nothing beyond this machine's memory.
    let opensPeers: Bool
    let submits: Bool
    /// The host services the instance keeps a pointer to for its whole life.
    private let services = UnsafeMutablePointer<te_host_services>.allocate(capacity: 1)
    private var reply = [CChar](repeating: 0, count: 64 << 10)

    init(name: String) throws {
        self.name = name
        let directory = ProcessInfo.processInfo.environment["TE_FUZZ_PLUGIN_DIR"] ?? "."
        let path = "\(directory)/libtransport_\(name).so"
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw PluginHarnessUnavailable(reason: "\(path): \(String(cString: dlerror()))")
        }
        guard let symbol = dlsym(handle, "te_transport_plugin_entry") else { throw PluginHarnessUnavailable(reason: "\(path) has no entry symbol") }
        typealias Entry = @convention(c) () -> UnsafePointer<te_plugin_descriptor>
        let descriptor = unsafeBitCast(symbol, to: Entry.self)()
        guard descriptor.pointee.struct_size >= UInt32(MemoryLayout<te_plugin_descriptor>.size) else {
            throw PluginHarnessUnavailable(reason: "\(path): descriptor of \(descriptor.pointee.struct_size) bytes")
        }
        vtable = descriptor.pointee
        var options = "{}"
        switch name {
        case "cxl":
            let pool = "/dev/shm/te-fuzz-pool-\(getpid())"
            let fd = open(pool, O_CREAT | O_RDWR | O_TRUNC, 0o600)
            guard fd >= 0, ftruncate(fd, 64 << 20) == 0 else { throw PluginHarnessUnavailable(reason: "cannot create \(pool)") }
            close(fd)
            atexit { unlink("/dev/shm/te-fuzz-pool-\(getpid())") }
            options = #"{"options":{"MC_CXL_DEV_PATH":"\#(pool)"}}"#
        case "efa":
            options = #"{"local_hostname":"127.0.0.1","options":{"MC_EFA_PROVIDER":"tcp;ofi_rxm"}}"#
        case "ascend":
            // No CANN here: the tests' stand-in (one NPU of host memory), built by scripts/fuzz.sh.
            let standIn = ProcessInfo.processInfo.environment["TE_FUZZ_ASCEND_STANDIN"] ?? ""
            options = #"{"local_hostname":"127.0.0.1","options":{"MC_ASCEND_LIBRARY":"\#(standIn)","MC_ASCEND_ACL_LIBRARY":"\#(standIn)","MC_ASCEND_CONNECT_TIMEOUT_MS":"100"}}"#
        default: break
        }
        // shm proves a peer over the host's handshake, efa exchanges addresses over it: refused here.
        services.initialize(to: te_host_services())
        services.pointee.struct_size = UInt32(MemoryLayout<te_host_services>.size)
        services.pointee.handshake_send = { _, _, _, _ in TE_ERR_PEER_UNREACHABLE }
        var created: OpaquePointer?
        let create = descriptor.pointee.create, host = UnsafePointer(services)
        let status = options.withCString { create?($0, host, &created) }
        guard status == TE_OK, let created else {
            throw PluginHarnessUnavailable(reason: "\(name): create failed with status \(status.map(String.init) ?? "-") (no hardware here?)")
        }
        instance = created
        // nvmeof and rdma would connect to the addresses a descriptor names; the others stay local
        // (ascend's stand-in looks its servers up in files).
        opensPeers = ["cxl", "shm", "efa", "ascend"].contains(name)
        submits = name == "cxl"
        local.initializeMemory(as: UInt8.self, repeating: 0x3C, count: 1 << 20)
        if let text = call({ vtable.local_descriptor?(instance, $0) }), let own = try? JSONValue.parse(Array(text.utf8)), case .object(let fields) = own {
            for (key, value) in fields {
                switch value {
                case .string(let text): placeholders["@\(key)@"] = text
                case .uint(let number): placeholders["@\(key)@"] = String(number)
                default: break
                }
            }
        }
        _ = call { vtable.register_memory?(instance, UInt64(UInt(bitPattern: local)), 1 << 20, "cpu:0", $0) }
        // Memory of the plugin's own (a cxl pool buffer), registered, so requests can succeed too.
        var own: UInt64 = 0
        if name == "cxl", vtable.allocate_memory?(instance, 4 << 20, "cpu:0", &own) == TE_OK {
            _ = call { vtable.register_memory?(instance, own, 4 << 20, "cpu:0", $0) }
            placeholders["@own_buffer@"] = String(own)
        }
    }

    /// Calls a plugin entry that writes text into a buffer; the text, or nil on an error.
    private func call(_ body: (UnsafeMutablePointer<te_buffer>) -> Int32?) -> String? {
        reply.withUnsafeMutableBufferPointer { storage -> String? in
            var buffer = te_buffer(data: storage.baseAddress, capacity: storage.count, length: 0)
            guard body(&buffer) == TE_OK else { return nil }
            return String(cString: storage.baseAddress!)
        }
    }

    func run(_ data: UnsafeRawBufferPointer) {
        var text = String(decoding: data, as: UTF8.self)
        if text.contains("@") { for (key, value) in placeholders { text = text.replacingOccurrences(of: key, with: value) } }
        _ = call { buffer in text.withCString { vtable.on_handshake?(instance, $0, buffer) } }
        guard opensPeers else { return }
        var peer: UInt64 = 0
        let opened = text.withCString { vtable.open_peer?(instance, "fuzz-peer", $0, &peer) }
        guard opened == TE_OK else { return }
        defer { vtable.close_peer?(instance, peer) }
        guard submits, let parsed = try? JSONValue.parse(Array(text.utf8)), case .array(let buffers)? = parsed["buffers"] else { return }
        var requests: [te_request] = []
        let base = UInt64(UInt(bitPattern: local))
        for buffer in buffers.prefix(2) {
            guard let address = buffer["addr"]?.uint64Value, let length = buffer["length"]?.uint64Value else { continue }
            // At the start, at the last byte, across the end, just before the start.
            for (offset, size) in [(UInt64(0), min(length, 4096)), (length &- 1, 1), (length &- 64, 128), (UInt64.max, 2)] where size > 0 {
                let opcode = requests.count % 2 == 0 ? TE_OP_WRITE : TE_OP_READ
                requests.append(te_request(opcode: opcode, flags: 0, local_addr: base, peer: peer, remote_addr: address &+ offset,
                                           length: min(size, 1 << 20), cookie: UInt64(requests.count)))
            }
        }
        guard !requests.isEmpty else { return }
        var accepted = 0
        _ = requests.withUnsafeBufferPointer { vtable.submit?(instance, $0.baseAddress, $0.count, MemoryLayout<te_request>.stride, &accepted) }
        var completions = [te_completion](repeating: te_completion(), count: 16)
        var harvested = 0, tries = 0
        while harvested < accepted && tries < 100 {
            var count = 0
            _ = completions.withUnsafeMutableBufferPointer { vtable.poll?(instance, $0.baseAddress, $0.count, MemoryLayout<te_completion>.stride, 1_000_000, &count) }
            harvested += count
            tries += 1
        }
    }
}

/// Why a plugin harness cannot run on this machine (the plugin was not built, or has no hardware).
struct PluginHarnessUnavailable: Error {
    let reason: String
}
