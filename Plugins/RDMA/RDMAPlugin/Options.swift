import CRDMAShim
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What create/probe receive, and the settings derived from it (upstream's names where upstream has one).
struct RDMAOptions {
    /// Requested devices; nil means auto-discovery (every device with an ACTIVE port).
    var devices: [String]?
    var segmentName: String
    /// `MC_GID_INDEX` (or `NCCL_IB_GID_INDEX`); nil = choose automatically.
    var gidIndex: UInt32?
    /// `MC_SLICE_SIZE` (64 KiB).
    var sliceSize: UInt64
    /// `MC_NUM_QP_PER_EP` (2).
    var queuePairsPerEndpoint: Int
    /// `MC_MAX_WR` (256): send queue depth of each QP.
    var maxWorkRequests: Int
    /// `MC_MTU` in bytes (4096), clamped to the port's active MTU.
    var mtu: UInt32
    var trafficClass: UInt8
    var serviceLevel: UInt8
    /// `MC_RETRY_CNT` (9): how often a failed slice is posted again (after the endpoint is rebuilt).
    var retryCount: Int
    /// `MC_SLICE_TIMEOUT` seconds (30): a work request not completed by then puts its endpoint in
    /// the error state (soft-RoCE, for one, retries a dead peer forever), which fails and retries its slices.
    var sliceTimeoutNanoseconds: UInt64
    /// `MC_RDMA_SPIN_US` (10): how long a completion thread polls before it sleeps on the channel.
    var spinNanoseconds: UInt64
    /// `MC_RDMA_CALLER_POLL_US` (1000): while a caller polled the CQ itself within this window (a
    /// synchronous transfer), the completion thread leaves the CQ unarmed and naps; 0 turns that off.
    var callerWindowNanoseconds: UInt64
    /// `MC_RDMA_MAX_ENDPOINTS` (1024): connections per device; a handshake past it is refused.
    var maxEndpoints: Int

    init(json: String?) {
        let raw = CreateOptions(json: json)
        let setting = raw.setting, number = raw.number
        devices = raw.requestedDevices ?? setting("MC_TE_FILTERS").map(CreateOptions.list)
        segmentName = raw.segmentName
        gidIndex = (setting("MC_GID_INDEX") ?? setting("NCCL_IB_GID_INDEX")).flatMap { Int($0) }.flatMap { $0 >= 0 ? UInt32($0) : nil }
        sliceSize = max(4096, number("MC_SLICE_SIZE", 65536))
        queuePairsPerEndpoint = Int(min(max(number("MC_NUM_QP_PER_EP", 2), 1), 64))
        maxWorkRequests = Int(min(max(number("MC_MAX_WR", 256), 1), 16384))
        mtu = UInt32(number("MC_MTU", 4096))
        trafficClass = UInt8(truncatingIfNeeded: number("MC_IB_TC", 0))
        serviceLevel = UInt8(truncatingIfNeeded: number("MC_IB_SL", 0))
        retryCount = Int(min(number("MC_RETRY_CNT", 9), 100))
        spinNanoseconds = number("MC_RDMA_SPIN_US", 10) * 1000
        callerWindowNanoseconds = min(number("MC_RDMA_CALLER_POLL_US", 1000), 1_000_000) * 1000
        sliceTimeoutNanoseconds = number("MC_SLICE_TIMEOUT", 30) * 1_000_000_000
        maxEndpoints = Int(min(max(number("MC_RDMA_MAX_ENDPOINTS", 1024), 1), 1 << 20))
    }

    /// IBV_MTU_* for a byte count.
    static func mtuEnum(bytes: UInt32) -> UInt32 {
        switch bytes {
        case ..<512: return 1
        case ..<1024: return 2
        case ..<2048: return 3
        case ..<4096: return 4
        default: return 5
        }
    }
}

/// Discovery results: devices with an ACTIVE port and the GID chosen on it.
struct DiscoveredDevice {
    var info: rdma_device_info
    var gid: rdma_gid
    var numaNode: Int

    var name: String { withUnsafeBytes(of: info.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) } }
}

enum Discovery {
    /// Lists devices, or the errno when the verbs stack is missing.
    static func devices() -> Result<[rdma_device_info], VerbsError> {
        var entries = [rdma_device_info](repeating: rdma_device_info(), count: 32)
        let count = entries.withUnsafeMutableBufferPointer { rdma_list_devices($0.baseAddress, $0.count) }
        if count < 0 { return .failure(VerbsError(code: -count)) }
        return .success(Array(entries.prefix(min(Int(count), entries.count))))
    }

    /// The GID upstream would choose: MC_GID_INDEX, else a RoCE v2 IPv4-mapped GID on a netdev,
    /// else any RoCE v2 GID, else the first one (InfiniBand).
    static func chooseGID(_ info: rdma_device_info, forced: UInt32?) -> rdma_gid? {
        let gids = withUnsafeBytes(of: info.gids) { raw in
            Array(raw.bindMemory(to: rdma_gid.self).prefix(Int(info.gid_count)))
        }
        if let forced { return gids.first { $0.index == forced } }
        func ipv4Mapped(_ gid: rdma_gid) -> Bool {
            withUnsafeBytes(of: gid.raw) { b in b[0..<10].allSatisfy { $0 == 0 } && b[10] == 0xff && b[11] == 0xff }
        }
        return gids.first { $0.type == UInt32(RDMA_GID_ROCE_V2) && ipv4Mapped($0) && $0.netdev_index != 0 }
            ?? gids.first { $0.type == UInt32(RDMA_GID_ROCE_V2) }
            ?? gids.first
    }

    /// The device's NUMA node from sysfs, -1 when unknown.
    static func numaNode(of device: String) -> Int {
        guard let file = fopen("/sys/class/infiniband/\(device)/device/numa_node", "r") else { return -1 }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 32)
        guard fgets(&buffer, 32, file) != nil else { return -1 }
        return Int(String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)) ?? -1
    }

    /// Outcome for probe and create.
    enum Outcome {
        case found([DiscoveredDevice])
        case absent(reason: String, hint: String)
    }

    static func run(_ options: RDMAOptions) -> Outcome {
        let all: [rdma_device_info]
        switch devices() {
        case .failure(let error):
            let code = error.code
            // ENOSYS: libibverbs finds no kernel RDMA stack (no ib_uverbs): the same as zero devices.
            let why = code == ENOSYS ? "the kernel has no RDMA stack (ibv_get_device_list: ENOSYS)"
                                      : "ibv_get_device_list failed: \(String(cString: strerror(code)))"
            return .absent(reason: why, hint: "load the RDMA drivers (ib_uverbs and the NIC's driver, or rdma_rxe for soft-RoCE)")
        case .success(let list):
            all = list
        }
        let names = all.map { withUnsafeBytes(of: $0.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) } }
        if all.isEmpty {
            return .absent(reason: "no RDMA devices (ibv_get_device_list found none)", hint: "check `ibv_devices`; for soft-RoCE: rdma link add rxe0 type rxe netdev <if>")
        }
        var chosen: [DiscoveredDevice] = []
        var problems: [String] = []
        for (info, name) in zip(all, names) {
            if let wanted = options.devices, !wanted.contains(name) { continue }
            guard info.port != 0 else { problems.append("\(name): no ACTIVE port"); continue }
            guard let gid = chooseGID(info, forced: options.gidIndex) else {
                problems.append("\(name): no usable GID\(options.gidIndex.map { " at MC_GID_INDEX=\($0)" } ?? "")")
                continue
            }
            chosen.append(DiscoveredDevice(info: info, gid: gid, numaNode: numaNode(of: name)))
        }
        if let wanted = options.devices {
            for name in wanted where !names.contains(name) { problems.append("\(name): no such device") }
        }
        if chosen.isEmpty {
            return .absent(reason: "no usable RDMA device (\(problems.joined(separator: "; "))); present: \(names.joined(separator: ", "))",
                           hint: "set device_name to an active device or to auto-discovery")
        }
        return .found(chosen)
    }
}

/// Upstream's GID text.
enum GIDText {
    /// Upstream's GID text: 16 lower-case hex pairs joined by ':'.
    static func gid(_ raw: [UInt8]) -> String {
        raw.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    static func parseGID(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":")
        guard parts.count == 16 else { return nil }
        let bytes = parts.compactMap { UInt8($0, radix: 16) }
        return bytes.count == 16 ? bytes : nil
    }
}

/// An errno from libibverbs.
struct VerbsError: Error {
    var code: Int32
    var text: String { String(cString: strerror(code)) }
}

/// A failure with a sentence for the user.
struct FailureText: Error {
    var text: String
    /// The peer refused because its own handshake to us goes first (see `RDMAInstance.simultaneousOpen`).
    var simultaneousOpen = false
    init(_ text: String, simultaneousOpen: Bool = false) {
        self.text = text
        self.simultaneousOpen = simultaneousOpen
    }
}
