import FoundationEssentials
import TransportPluginKit

// What GPU segments publish and how a peer's buffers are found: pure code,
// tested without a GPU (Tests/GPUPluginTests).

/// Which protocol this plugin runs as.
public enum GPUMode: String, Sendable {
    /// Same host: CUDA IPC memory handles (`cuIpcGetMemHandle`), upstream's default nvlink path.
    case intra = "nvlink_intra"
    /// Multi-node NVLink: fabric handles of `cuMemCreate` allocations (upstream's fabric path).
    case mnnvl = "nvlink"
    /// Same host, AMD GPUs: HIP IPC memory handles (`hipIpcGetMemHandle`).
    case hip = "hip"

    /// The descriptor's `gpu_handle_type`: peers must use the same kind.
    public var handleType: String {
        switch self {
        case .intra: return "cuda_ipc"
        case .mnnvl: return "cuda_fabric"
        case .hip: return "hip_ipc"
        }
    }

    /// Whether handles only open on the same host.
    public var sameHostOnly: Bool { self != .mnnvl }
    /// The memory location prefix of this runtime's devices ("cuda:0", "hip:1").
    public var locationPrefix: String { self == .hip ? "hip:" : "cuda:" }
    /// The runtime behind it (GPU_RUNTIME_* in the shim).
    public var runtime: Int32 { self == .hip ? 1 : 0 }
}

/// Settings from probe/create's options JSON.
public struct GPUOptions: Equatable, Sendable {
    public var mode: GPUMode = .mnnvl
    /// The GPU this engine copies with (`device_name` "cuda:N" / "hip:N", "N" or empty for 0).
    public var device: Int32 = 0
    /// `MC_CUDA_LIBRARY` / `MC_HIP_LIBRARY`: the runtime library (default libcuda.so.1 / libamdhip64.so.6 or .so.5).
    public var library: String = ""
    /// `MC_GPU_WORKERS`: copy threads (default 2).
    public var workers = 2

    public init() {}

    /// Parses the host's options JSON; throws a sentence for the user.
    public init(json: String) throws {
        let raw: CreateOptions
        do { raw = try CreateOptions(validating: json) } catch { throw GPUError(error.message) }
        mode = GPUMode(rawValue: raw.transportProtocol) ?? .mnnvl
        let name = raw.deviceName
        if !name.isEmpty && name != "auto-discovery" {
            let digits = name.hasPrefix(mode.locationPrefix) ? String(name.dropFirst(mode.locationPrefix.count)) : name
            guard let ordinal = Int32(digits), ordinal >= 0 else {
                throw GPUError("device_name '\(name)' is not a GPU (\(mode.locationPrefix)N or N)")
            }
            device = ordinal
        }
        let options = raw.settings
        library = options[mode == .hip ? "MC_HIP_LIBRARY" : "MC_CUDA_LIBRARY"] ?? ""
        if let text = options["MC_GPU_WORKERS"], !text.isEmpty {
            guard let n = Int(text), (1...32).contains(n) else { throw GPUError("MC_GPU_WORKERS='\(text)' must be 1...32") }
            workers = n
        }
    }
}

/// A failure with the words the user sees.
public struct GPUError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ text: String) { description = text }
}

/// Upstream's `shm_name` form of a handle: upper-case hex, two digits a byte.
public enum HandleText {
    public static func encode(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes { out += [digits[Int(byte >> 4)], digits[Int(byte & 15)]] }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes hex of either case; nil for odd length or a non-hex digit.
    public static func decode(_ text: String) -> [UInt8]? { text.isEmpty ? [] : JSONFragment.unhex(text) }
}

/// One device buffer a peer published.
public struct PeerBuffer: Equatable, Sendable {
    /// The address in the owner's process (what requests name).
    public var address: UInt64
    public var length: UInt64
    /// The IPC or fabric handle of the allocation holding it.
    public var handle: [UInt8]
    /// Where the buffer starts inside that allocation.
    public var offset: UInt64
    /// Size of the allocation (what a fabric import maps).
    public var allocationSize: UInt64
}

/// The part of a peer's segment descriptor the plugin reads.
public struct PeerSegment: Equatable, Sendable {
    public var bootID: String?
    public var handleType: String?
    public var buffers: [PeerBuffer]

    private struct Raw: Decodable {
        struct Buffer: Decodable {
            var addr: UInt64
            var length: UInt64
            var shm_name: String?
            var gpu_offset: UInt64?
            var gpu_alloc_size: UInt64?
        }
        var gpu_boot_id: String?
        var gpu_handle_type: String?
        var buffers: [Buffer]?
    }

    /// Parses a descriptor; buffers without a well-formed 64-byte handle, or whose numbers do not
    /// fit together (the address range wraps, `gpu_offset + length` overflows or passes
    /// `gpu_alloc_size`), are not reachable and left out: a descriptor is the peer's word, never trusted.
    public init(json: String) throws {
        guard let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else { throw GPUError("malformed segment descriptor") }
        bootID = raw.gpu_boot_id
        handleType = raw.gpu_handle_type
        buffers = (raw.buffers ?? []).compactMap { entry in
            guard let text = entry.shm_name, let handle = HandleText.decode(text), handle.count == 64 else { return nil }
            let offset = entry.gpu_offset ?? 0  // upstream registers allocation bases
            let (end, overflow) = offset.addingReportingOverflow(entry.length)
            guard entry.length > 0, !overflow, !entry.addr.addingReportingOverflow(entry.length).overflow else { return nil }
            let allocationSize = entry.gpu_alloc_size ?? end
            guard end <= allocationSize else { return nil }
            return PeerBuffer(address: entry.addr, length: entry.length, handle: handle, offset: offset, allocationSize: allocationSize)
        }
    }

    /// Why this engine cannot reach the peer's buffers, or nil when it can.
    public func unreachableReason(mode: GPUMode, localBootID: String) -> String? {
        if let handleType, handleType != mode.handleType {
            return "the peer publishes \(handleType) handles, this engine runs \(mode.rawValue) (\(mode.handleType))"
        }
        if mode.sameHostOnly && bootID != localBootID {
            return "IPC handles only open on the same host (peer boot id \(bootID ?? "none"), ours \(localBootID))"
        }
        return nil
    }

    /// The buffer holding [address, address+length), if one does (overflow-safe).
    public func buffer(containing address: UInt64, length: UInt64) -> PeerBuffer? {
        buffers.first { address >= $0.address && address - $0.address <= $0.length && length <= $0.length - (address - $0.address) }
    }
}
