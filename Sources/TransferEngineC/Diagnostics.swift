import CTransferEngineC
import TransferEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Upstream's newer entry points: topology and links, per-NIC load, warm-up, forgetting a
// cached segment, graceful shutdown.

@_cdecl("discoverTopology")
public func discoverTopology(_ handle: UnsafeMutableRawPointer?) -> Int32 {
    guard HandleTable.lookup(handle) != nil else { CResult.fail("invalid engine handle"); return -1 }
    // The transports discover their devices and topology when they are installed; nothing to redo.
    CResult.clear()
    return 0
}

@_cdecl("showLinks")
public func showLinks(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int, _ json: Int32) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let buffer, length > 0 else { CResult.fail("buf_out is NULL or buf_len is 0"); return -1 }
    // As upstream (snprintf): the report, cut to the buffer when longer.
    let bytes = Array(engine.linksReport(json: json != 0).utf8.prefix(length - 1))
    for (i, byte) in bytes.enumerated() { buffer[i] = CChar(bitPattern: byte) }
    buffer[bytes.count] = 0
    CResult.clear()
    return 0
}

@_cdecl("getMetrics")
public func getMetrics(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int, _ prometheus: Int32) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let buffer, length > 0 else { CResult.fail("buf_out is NULL or buf_len is 0"); return -1 }
    let text = prometheus != 0 ? engine.metricsText : engine.metricsJSON.compactText
    let full = Array(text.utf8)
    let bytes = full.prefix(length - 1)
    for (i, byte) in bytes.enumerated() { buffer[i] = CChar(bitPattern: byte) }
    buffer[bytes.count] = 0
    CResult.clear()
    return Int32(clamping: full.count)
}

@_cdecl("getNicLoadStats")
public func getNicLoadStats(_ handle: UnsafeMutableRawPointer?, _ stats: UnsafeMutablePointer<nic_load_stat_t>?,
                            _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let stats, let count else { CResult.fail("stats or count is NULL"); return -1 }
    // As upstream: up to *count entries copied, *count set to how many devices there are.
    let loads = engine.nicLoadStats()
    for (i, load) in loads.prefix(count.pointee).enumerated() {
        var entry = nic_load_stat_t()
        withUnsafeMutableBytes(of: &entry.device_name) { raw in
            let name = Array(load.deviceName.utf8.prefix(raw.count - 1))
            for (j, byte) in name.enumerated() { raw[j] = byte }
            raw[name.count] = 0
        }
        entry.inflight_bytes = load.inflightBytes
        entry.ewma_bandwidth_bps = load.ewmaBandwidthBps
        stats[i] = entry
    }
    count.pointee = loads.count
    CResult.clear()
    return 0
}

@_cdecl("warmupEfaSegment")
public func warmupEfaSegment(_ handle: UnsafeMutableRawPointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let segment = CResult.string(name, "segment_name") else { return -1 }
    CResult.clear()
    // As upstream: nothing to do for an empty name or the engine's own.
    if segment.isEmpty || segment == engine.segmentName { return 0 }
    do {
        _ = try engine.openSegment(segment)
    } catch {
        CResult.fail("\(error)")
        return -1  // ERR_INVALID_ARGUMENT: an unknown segment, as upstream
    }
    do {
        try engine.warmUp(segment: segment)
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("removeLocalSegment")
public func removeLocalSegment(_ handle: UnsafeMutableRawPointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let segment = CResult.string(name, "segment_name") else { return -1 }
    do {
        try engine.forgetSegment(named: segment)
        CResult.clear()
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("enableGracefulShutdown")
public func enableGracefulShutdown(_ handle: UnsafeMutableRawPointer?) {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return }
    engine.enableGracefulShutdown()
    CResult.clear()
}
