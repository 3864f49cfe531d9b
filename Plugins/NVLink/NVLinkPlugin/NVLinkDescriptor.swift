import FoundationEssentials

// What nvlink segments publish and how a peer's buffers are found: pure code,
// tested without a GPU (Tests/NVLinkPluginTests).

/// Which of the two protocols this plugin runs as.
public enum NVLinkMode: String, Sendable {
    /// Same host: CUDA IPC memory handles (`cuIpcGetMemHandle`), upstream's default nvlink path.
    case intra = "nvlink_intra"
    /// Multi-node NVLink: fabric handles of `cuMemCreate` allocations (upstream's fabric path).
    case mnnvl = "nvlink"

    /// The descriptor's `nvlink_handle_type`.
    public var handleType: String { self == .intra ? "ipc" : "fabric" }
}

/// Settings from probe/create's options JSON.
public struct NVLinkOptions: Equatable, Sendable {
    public var mode: NVLinkMode = .mnnvl
    /// The CUDA device this engine copies with (`device_name` "cuda:N", "N" or empty for 0).
    public var device: Int32 = 0
    /// `MC_CUDA_LIBRARY`: the driver library (default libcuda.so.1).
    public var library: String = ""
    /// `MC_NVLINK_WORKERS`: copy threads (default 2).
    public var workers = 2

    public init() {}

    private struct Raw: Decodable {
        var `protocol`: String?
        var device_name: String?
        var options: [String: String]?
    }

    /// Parses the host's options JSON; throws a sentence for the user.
    public init(json: String) throws {
        guard let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else { throw NVLinkError("options are not a JSON object") }
        mode = raw.protocol == NVLinkMode.intra.rawValue ? .intra : .mnnvl
        let name = raw.device_name ?? ""
        if !name.isEmpty && name != "auto-discovery" {
            let digits = name.hasPrefix("cuda:") ? String(name.dropFirst(5)) : name
            guard let ordinal = Int32(digits), ordinal >= 0 else {
                throw NVLinkError("device_name '\(name)' is not a CUDA device (cuda:N or N)")
            }
            device = ordinal
        }
        let options = raw.options ?? [:]
        library = options["MC_CUDA_LIBRARY"] ?? ""
        if let text = options["MC_NVLINK_WORKERS"], !text.isEmpty {
            guard let n = Int(text), (1...32).contains(n) else { throw NVLinkError("MC_NVLINK_WORKERS='\(text)' must be 1...32") }
            workers = n
        }
    }
}

/// A failure with the words the user sees.
public struct NVLinkError: Error, CustomStringConvertible, Equatable {
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
    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 65...70: return c - 55
            case 97...102: return c - 87
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let high = value(chars[i]), let low = value(chars[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }
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
            var nvlink_offset: UInt64?
            var nvlink_alloc_size: UInt64?
        }
        var nvlink_boot_id: String?
        var nvlink_handle_type: String?
        var buffers: [Buffer]?
    }

    /// Parses a descriptor; buffers without a well-formed 64-byte handle are not reachable and left out.
    public init(json: String) throws {
        guard let raw = try? JSONDecoder().decode(Raw.self, from: Data(json.utf8)) else { throw NVLinkError("malformed segment descriptor") }
        bootID = raw.nvlink_boot_id
        handleType = raw.nvlink_handle_type
        buffers = (raw.buffers ?? []).compactMap { entry in
            guard let text = entry.shm_name, let handle = HandleText.decode(text), handle.count == 64 else { return nil }
            let offset = entry.nvlink_offset ?? 0  // upstream registers allocation bases
            return PeerBuffer(address: entry.addr, length: entry.length, handle: handle, offset: offset,
                              allocationSize: entry.nvlink_alloc_size ?? (offset + entry.length))
        }
    }

    /// Why this engine cannot reach the peer's buffers, or nil when it can.
    public func unreachableReason(mode: NVLinkMode, localBootID: String) -> String? {
        if let handleType, handleType != mode.handleType {
            return "the peer publishes \(handleType) handles, this engine runs \(mode.rawValue) (\(mode.handleType))"
        }
        if mode == .intra && bootID != localBootID {
            return "CUDA IPC handles only open on the same host (peer boot id \(bootID ?? "none"), ours \(localBootID))"
        }
        return nil
    }

    /// The buffer holding [address, address+length), if one does (overflow-safe).
    public func buffer(containing address: UInt64, length: UInt64) -> PeerBuffer? {
        buffers.first { address >= $0.address && address - $0.address <= $0.length && length <= $0.length - (address - $0.address) }
    }
}
