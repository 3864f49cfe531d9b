import CTransferEngineC
import FoundationEssentials
import TransferEngine

// Entry points this engine adds to transfer_engine_c.h (declared under
// "Additions" in the header); the Python package uses them.

@_cdecl("createTransferEngineExt")
public func createTransferEngineExt(_ metadata: UnsafePointer<CChar>?, _ hostname: UnsafePointer<CChar>?,
                                    _ proto: UnsafePointer<CChar>?, _ device: UnsafePointer<CChar>?) -> UnsafeMutableRawPointer? {
    guard let metadata = CResult.string(metadata, "metadata_conn_string"),
          let host = CResult.string(hostname, "local_hostname") else { return nil }
    let protocolName = proto.flatMap { String(validatingCString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    let deviceName = device.flatMap { String(validatingCString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    return startEngine(EngineConfiguration.Overrides(localHostname: host, metadataServer: metadata,
                                                     protocolName: protocolName, deviceName: deviceName))
}

@_cdecl("te_active_protocol")
public func teActiveProtocol(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    return copyOut(engine.activeProtocol, to: buffer, length: length)
}

@_cdecl("te_transfer_sync")
public func teTransferSync(_ handle: UnsafeMutableRawPointer?, _ segment: Int32, _ opcode: Int32, _ local: UnsafeMutableRawPointer?,
                           _ remote: UInt64, _ length: UInt64) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let operation = TransferRequest.Operation(rawValue: opcode) else { CResult.fail("opcode \(opcode) (0 READ, 1 WRITE)"); return -1 }
    do {
        try engine.transferSync(operation, localAddress: UInt64(UInt(bitPattern: local)), segment: segment, remoteAddress: remote, length: length)
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("te_transfer_sync_hint")
public func teTransferSyncHint(_ handle: UnsafeMutableRawPointer?, _ segment: Int32, _ opcode: Int32, _ local: UnsafeMutableRawPointer?,
                               _ remote: UInt64, _ length: UInt64, _ hint: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let operation = TransferRequest.Operation(rawValue: opcode) else { CResult.fail("opcode \(opcode) (0 READ, 1 WRITE)"); return -1 }
    guard let hint = checkedHint(hint) else { return -1 }
    do {
        try engine.transferSync(operation, localAddress: UInt64(UInt(bitPattern: local)), segment: segment, remoteAddress: remote, length: length,
                                transportHint: hint)
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("te_submit_transfer_hint")
public func teSubmitTransferHint(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64, _ entries: UnsafeMutablePointer<transfer_request>?,
                                 _ count: Int, _ hint: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 1 }
    guard let hint = checkedHint(hint) else { return CResult.statusCode(EngineError.invalidArgument("hint is not UTF-8")) }
    do {
        try engine.submit(try requests(entries, count), to: batch, transportHint: hint)
        return 0
    } catch { return CResult.statusCode(error) }
}

/// A C transport hint: "" for none (NULL), nil (with the error set) when it is not UTF-8.
func checkedHint(_ hint: UnsafePointer<CChar>?) -> String? {
    guard let hint else { return "" }
    guard let text = String(validatingCString: hint) else {
        CResult.fail("transport hint is not valid UTF-8")
        return nil
    }
    return text
}

@_cdecl("te_allocate_batch_timeout")
public func teAllocateBatchTimeout(_ handle: UnsafeMutableRawPointer?, _ size: Int, _ timeoutMs: UInt64) -> UInt64 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return UInt64.max }
    guard timeoutMs >= 1, timeoutMs <= 86_400_000 else { CResult.fail("timeout_ms \(timeoutMs) (1 ... 86400000)"); return UInt64.max }
    do { return try engine.allocateBatch(capacity: size, timeoutNs: timeoutMs * 1_000_000) } catch { _ = CResult.errorCode(error); return UInt64.max }
}

@_cdecl("te_active_protocols")
public func teActiveProtocols(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    return copyOut(engine.activeProtocols.joined(separator: ","), to: buffer, length: length)
}

@_cdecl("te_wait_batch")
public func teWaitBatch(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64, _ timeoutMs: UInt64) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    do {
        guard try engine.wait(batch: batch, timeoutNs: min(timeoutMs, 86_400_000) * 1_000_000) else { return 0 }
        if let failed = try engine.statuses(batch: batch).first(where: { $0.state != .completed }) {
            CResult.fail(failed.error ?? "a task failed")
            return -1
        }
        return 1
    } catch { return CResult.errorCode(error) }
}

@_cdecl("te_first_buffer_address")
public func teFirstBufferAddress(_ handle: UnsafeMutableRawPointer?, _ segment: Int32) -> UInt64 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 0 }
    do { return try engine.descriptor(of: segment).buffers.first?.address ?? 0 } catch { _ = CResult.errorCode(error); return 0 }
}

@_cdecl("te_send_probe")
public func teSendProbe(_ handle: UnsafeMutableRawPointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let segment = CResult.string(name, "segment_name") else { return -1 }
    do { try engine.probe(segmentName: segment); return 0 } catch { return CResult.errorCode(error) }
}

@_cdecl("te_protocol_available")
public func teProtocolAvailable(_ proto: UnsafePointer<CChar>?) -> Int32 {
    guard let name = proto.flatMap({ String(validatingCString: $0) })?.lowercased() else { return 0 }
    if name == "tcp" { return 1 }
    var environment = ProcessInfo.processInfo.environment
    environment["MC_STRICT_PROTOCOL"] = "1"
    let catalog = PluginCatalog(environment: environment)
    guard let selection = try? ProtocolSelector.select(requested: name, catalog: catalog, environment: environment, probeOptions: {
        TransferEngine.pluginOptions(configuration: EngineConfiguration(), segmentName: "", environment: environment, protocolName: $0)
    }) else { return 0 }
    return selection.plugin != nil ? 1 : 0
}

@_cdecl("te_allocate_managed_buffer")
public func teAllocateManagedBuffer(_ handle: UnsafeMutableRawPointer?, _ length: Int, _ location: UnsafePointer<CChar>?) -> UnsafeMutableRawPointer? {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return nil }
    guard length > 0 else { CResult.fail("length is 0"); return nil }
    var place = "cpu:0"
    if let location {
        guard let text = CResult.string(location, "location") else { return nil }
        if !text.isEmpty { place = text }
    }
    do {
        let address = try engine.allocateManagedBuffer(length: UInt64(length), location: place)
        CResult.clear()
        return UnsafeMutableRawPointer(bitPattern: UInt(address))
    } catch {
        _ = CResult.errorCode(error)
        return nil
    }
}

@_cdecl("te_free_managed_buffer")
public func teFreeManagedBuffer(_ handle: UnsafeMutableRawPointer?, _ address: UnsafeMutableRawPointer?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let address else { CResult.fail("addr is NULL"); return -1 }
    do {
        try engine.freeManagedBuffer(address: UInt64(UInt(bitPattern: address)))
        CResult.clear()
        return 0
    } catch { return CResult.errorCode(error) }
}
