import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What the host learned from a plugin's descriptor.
public struct PluginInfo: Sendable, Equatable {
    /// The `.so` path.
    public var path: String
    /// Plugin name.
    public var name: String
    /// Plugin version string.
    public var version: String
    /// Protocols it serves.
    public var protocols: [String]
    /// TE_CAP_* flags.
    public var capabilities: UInt64
    /// ABI major.minor it was built against.
    public var abiVersion: String
    /// Size of its descriptor struct.
    public var descriptorSize: Int
}

/// Result of a plugin's probe.
public struct PluginProbe: Sendable, Equatable {
    /// The status code (TE_OK, TE_ERR_HARDWARE_ABSENT, ...).
    public var status: Int32
    /// Human-readable reason.
    public var reason: String
    /// What to install or set.
    public var hint: String

    /// Whether the plugin can run here.
    public var available: Bool { status == TE_OK }

    /// A one-word summary of the status.
    public var statusWord: String { PluginStatus.describe(status) }
}

/// Names for the ABI's status codes.
public enum PluginStatus {
    /// "ok", "hardware absent", "library missing", ...
    public static func describe(_ code: Int32) -> String {
        switch code {
        case TE_OK: return "ok"
        case TE_ERR_INVALID_ARGUMENT: return "invalid argument"
        case TE_ERR_HARDWARE_ABSENT: return "hardware absent"
        case TE_ERR_LIBRARY_MISSING: return "library missing"
        case TE_ERR_NOT_SUPPORTED: return "not supported"
        case TE_ERR_NO_RESOURCES: return "no resources"
        case TE_ERR_BUFFER_TOO_SMALL: return "buffer too small"
        case TE_ERR_OUT_OF_RANGE: return "out of range"
        case TE_ERR_PEER_UNREACHABLE: return "peer unreachable"
        case TE_ERR_AGAIN: return "try again"
        case TE_ERR_IO: return "I/O error"
        case TE_ERR_TIMEOUT: return "timeout"
        case TE_ERR_INTERNAL: return "internal error"
        case TE_ERR_REJECTED: return "rejected"
        default: return "error \(code)"
        }
    }
}

/// A plugin whose descriptor passed the ABI checks. Never unloaded: Swift
/// plugins cannot be safely `dlclose`d.
public final class LoadedPlugin: @unchecked Sendable {
    /// Descriptor facts.
    public let info: PluginInfo
    /// The host's own copy of the plugin's descriptor: the first `struct_size` bytes of the
    /// plugin's, the rest zero. An older plugin's smaller descriptor is never read past its
    /// end, and entries it does not have are nil here.
    let descriptor: UnsafePointer<te_plugin_descriptor>

    /// Whether the plugin offers allocate_memory/free_memory (ABI 1.1; nil in the copy when
    /// struct_size does not cover them).
    var allocatesMemory: Bool {
        descriptor.pointee.allocate_memory != nil && descriptor.pointee.free_memory != nil
    }

    /// Keeps `descriptor` (the host's copy). Never freed: a loaded plugin lives as long as the process.
    init(info: PluginInfo, descriptor: te_plugin_descriptor) {
        self.info = info
        let copy = UnsafeMutablePointer<te_plugin_descriptor>.allocate(capacity: 1)
        copy.initialize(to: descriptor)
        self.descriptor = UnsafePointer(copy)
    }

    /// The first `size` bytes of the plugin's descriptor in a zeroed current-size struct, cut to
    /// whole pointer-sized fields (an odd size must not leave half a function pointer behind).
    static func copyDescriptor(_ plugin: UnsafeRawPointer, size: Int) -> te_plugin_descriptor {
        var copy = te_plugin_descriptor()
        let whole = size / MemoryLayout<UnsafeRawPointer>.size * MemoryLayout<UnsafeRawPointer>.size
        withUnsafeMutableBytes(of: &copy) { $0.baseAddress!.copyMemory(from: plugin, byteCount: min(whole, $0.count)) }
        return copy
    }

    /// Asks the plugin whether it can run here.
    public func probe(optionsJSON: String) -> PluginProbe {
        guard let probe = descriptor.pointee.probe else {
            return PluginProbe(status: TE_ERR_INTERNAL, reason: "the plugin has no probe function", hint: "")
        }
        var reason = CStringBuffer(capacity: 1024)
        var hint = CStringBuffer(capacity: 512)
        let status = optionsJSON.withCString { options in
            reason.withBuffer { r in hint.withBuffer { h in probe(options, r, h) } }
        }
        return PluginProbe(status: status, reason: reason.string, hint: hint.string)
    }
}

/// A growable `te_buffer` for strings returned by plugins.
struct CStringBuffer {
    private var storage: [CChar]
    private var length = 0

    init(capacity: Int) { storage = [CChar](repeating: 0, count: max(1, capacity)) }

    /// Calls `body` with a te_buffer over the storage.
    mutating func withBuffer<R>(_ body: (UnsafeMutablePointer<te_buffer>) -> R) -> R {
        let capacity = storage.count
        var result: R!
        var reported = 0
        storage.withUnsafeMutableBufferPointer { raw in
            var buffer = te_buffer(data: raw.baseAddress, capacity: capacity, length: 0)
            result = body(&buffer)
            reported = buffer.length
        }
        length = min(reported, capacity - 1)
        return result
    }

    /// Calls `body` and, on TE_ERR_BUFFER_TOO_SMALL, once more with a buffer of the reported size.
    mutating func withRetry(_ body: (UnsafeMutablePointer<te_buffer>) -> Int32) -> Int32 {
        var reported = 0
        var status = withBuffer { buffer -> Int32 in
            let s = body(buffer)
            reported = buffer.pointee.length
            return s
        }
        if status == TE_ERR_BUFFER_TOO_SMALL, reported < 256 << 20 {
            storage = [CChar](repeating: 0, count: reported + 1)
            status = withBuffer(body)
        }
        return status
    }

    /// The text written (up to the NUL the callee wrote).
    var string: String {
        storage.withUnsafeBufferPointer { buffer in
            let bytes = UnsafeRawBufferPointer(buffer).prefix(length)
            let end = bytes.firstIndex(of: 0) ?? bytes.endIndex
            return String(decoding: bytes[..<end], as: UTF8.self)
        }
    }
}

/// Loads plugin files and checks their ABI.
public enum PluginLoader {
    /// Why a file was not accepted.
    public struct LoadError: Error, CustomStringConvertible, Sendable, Equatable {
        /// The file.
        public var path: String
        /// The reason, phrased for a user.
        public var reason: String
        public var description: String { "\(path): \(reason)" }
    }

    /// `dlopen`s `path` (RTLD_NOW | RTLD_LOCAL), finds the entry symbol and validates the descriptor.
    public static func load(path: String) -> Result<LoadedPlugin, LoadError> {
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let message = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            return .failure(LoadError(path: path, reason: explainDlopenFailure(message, path: path)))
        }
        guard let symbol = dlsym(handle, TE_PLUGIN_ENTRY_SYMBOL) else {
            return .failure(LoadError(path: path, reason: "not a transport plugin: it does not export '\(TE_PLUGIN_ENTRY_SYMBOL)'"))
        }
        let entry = unsafeBitCast(symbol, to: te_plugin_entry_fn.self)
        guard let descriptor = entry() else {
            return .failure(LoadError(path: path, reason: "its entry '\(TE_PLUGIN_ENTRY_SYMBOL)' returned no descriptor"))
        }
        // Read only the fixed header before trusting struct_size.
        let raw = UnsafeRawPointer(descriptor)
        let major = raw.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
        let minor = raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
        let size = Int(raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        guard major == TE_ABI_MAJOR else {
            return .failure(LoadError(path: path, reason: "ABI major version \(major) is not supported (this host speaks \(TE_ABI_MAJOR).\(TE_ABI_MINOR)); rebuild the plugin against this host's te_transport_abi.h"))
        }
        let minimum = MemoryLayout<te_plugin_descriptor>.offset(of: \te_plugin_descriptor.last_error)! + MemoryLayout<UnsafeRawPointer>.size
        guard size >= minimum else {
            return .failure(LoadError(path: path, reason: "descriptor of \(size) bytes is smaller than the ABI \(TE_ABI_MAJOR).0 minimum of \(minimum) bytes; the plugin was built against an incompatible header"))
        }
        // From here on only the host's copy is read: struct_size bytes, zero beyond.
        let d = LoadedPlugin.copyDescriptor(raw, size: size)
        guard let name = d.name.map({ String(cString: $0) }), !name.isEmpty,
              let protocolsText = d.protocols.map({ String(cString: $0) }) else {
            return .failure(LoadError(path: path, reason: "its descriptor has no name or protocol list"))
        }
        let protocols = protocolsText.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }.filter { !$0.isEmpty }
        guard !protocols.isEmpty else { return .failure(LoadError(path: path, reason: "its descriptor declares no protocol")) }
        let required: [(String, Bool)] = [
            ("probe", d.probe != nil), ("create", d.create != nil), ("destroy", d.destroy != nil),
            ("local_descriptor", d.local_descriptor != nil), ("register_memory", d.register_memory != nil),
            ("unregister_memory", d.unregister_memory != nil), ("open_peer", d.open_peer != nil),
            ("close_peer", d.close_peer != nil), ("on_handshake", d.on_handshake != nil), ("submit", d.submit != nil),
            ("poll", d.poll != nil), ("last_error", d.last_error != nil),
        ]
        if let missing = required.first(where: { !$0.1 }) {
            return .failure(LoadError(path: path, reason: "its descriptor leaves the required function '\(missing.0)' empty"))
        }
        let info = PluginInfo(path: path, name: name, version: d.version.map { String(cString: $0) } ?? "",
                              protocols: protocols, capabilities: d.capabilities, abiVersion: "\(major).\(minor)", descriptorSize: size)
        return .success(LoadedPlugin(info: info, descriptor: d))
    }

    /// Turns "libX.so.1: cannot open shared object file" into "the P plugin needs libX.so.1 (package ...)".
    static func explainDlopenFailure(_ message: String, path: String) -> String {
        let file = path.split(separator: "/").last.map(String.init) ?? path
        let plugin = PluginCatalog.protocolName(ofFile: file) ?? file
        if let range = message.firstRange(of: ": cannot open shared object file") {
            let library = String(message[..<range.lowerBound]).split(separator: "/").last.map(String.init) ?? ""
            if !library.isEmpty, library != file {
                return "the \(plugin) plugin needs \(library), which is not installed (install \(debianPackage(for: library))); loader said: \(message)"
            }
        }
        return "cannot be loaded: \(message)"
    }

    /// The Debian package that usually ships a library soname.
    static func debianPackage(for soname: String) -> String {
        let known: [String: String] = [
            "libibverbs.so.1": "libibverbs1", "librdmacm.so.1": "librdmacm1", "libfabric.so.1": "libfabric1",
            "libnvme.so.1": "libnvme1", "libcxl.so.1": "libcxl1", "libdaxctl.so.1": "libdaxctl1",
            "libamdhip64.so.5": "libamdhip64-5", "liburing.so.2": "liburing2",
        ]
        if let package = known[soname] { return "package \(package)" }
        if soname.hasPrefix("libswift") || soname.hasPrefix("libFoundation") || soname.hasPrefix("libdispatch") {
            return "the Swift runtime shipped with the transfer-engine package"
        }
        // libfoo.so.3 -> libfoo3, the usual Debian runtime package name.
        let parts = soname.components(separatedBy: ".so.")
        if parts.count == 2 { return "the package that provides it, usually \(parts[0])\(parts[1])" }
        return "the package that provides it"
    }
}

extension String {
    func components(separatedBy separator: String) -> [String] {
        var result: [String] = []
        var rest = Substring(self)
        while let range = rest.firstRange(of: separator) {
            result.append(String(rest[..<range.lowerBound]))
            rest = rest[range.upperBound...]
        }
        result.append(String(rest))
        return result
    }
}
