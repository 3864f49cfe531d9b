import CTransferEngineC
import FoundationEssentials
import TransferEngine

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The entry points of transfer_engine_c.h. Each validates its arguments and
// turns every Swift error into a return code plus te_last_error() text.

@_cdecl("createTransferEngine")
public func createTransferEngine(_ metadata: UnsafePointer<CChar>?, _ localServerName: UnsafePointer<CChar>?,
                                 _ ipOrHostName: UnsafePointer<CChar>?, _ rpcPort: UInt64, _ autoDiscover: Int32) -> UnsafeMutableRawPointer? {
    guard let metadata = CResult.string(metadata, "metadata_conn_string"),
          let serverName = CResult.string(localServerName, "local_server_name") else { return nil }
    guard rpcPort <= UInt64(UInt16.max) else { CResult.fail("rpc_port \(rpcPort) is not a TCP port"); return nil }
    var host: String? = nil
    if let ipOrHostName {
        guard let text = CResult.string(ipOrHostName, "ip_or_host_name") else { return nil }
        host = text.isEmpty ? nil : text
    }
    return startEngine(EngineConfiguration.Overrides(localHostname: serverName, metadataServer: metadata)) { configuration, _ in
        configuration.advertisedHost = host
        configuration.rpcPort = rpcPort == 0 ? nil : UInt16(rpcPort)
        // auto_discover: every chosen plugin finds its devices, unless a device list was given
        // (MOONCAKE_DEVICE or the config file).
        if autoDiscover != 0 && configuration.deviceName.isEmpty { configuration.deviceName = "auto-discovery" }
    }
}

@_cdecl("destroyTransferEngine")
public func destroyTransferEngine(_ handle: UnsafeMutableRawPointer?) {
    HandleTable.remove(handle)?.shutdown()
}

@_cdecl("installTransport")
public func installTransport(_ handle: UnsafeMutableRawPointer?, _ proto: UnsafePointer<CChar>?,
                             _ args: UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> UnsafeMutableRawPointer? {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return nil }
    guard let name = CResult.string(proto, "proto") else { return nil }
    do {
        try engine.installTransport(name)
    } catch {
        CResult.fail("\(error)")
        return nil
    }
    CResult.clear()
    return handle
}

@_cdecl("uninstallTransport")
public func uninstallTransport(_ handle: UnsafeMutableRawPointer?, _ proto: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let name = CResult.string(proto, "proto") else { return -1 }
    do {
        try engine.uninstallTransport(name)
        CResult.clear()
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("getLocalIpAndPort")
public func getLocalIpAndPort(_ handle: UnsafeMutableRawPointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ length: Int) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    return copyOut(engine.segmentName, to: buffer, length: length)
}

@_cdecl("openSegment")
public func openSegment(_ handle: UnsafeMutableRawPointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let segment = CResult.string(name, "segment_name") else { return -1 }
    do { return try engine.openSegment(segment) } catch { _ = CResult.errorCode(error); return -1 }
}

@_cdecl("openSegmentNoCache")
public func openSegmentNoCache(_ handle: UnsafeMutableRawPointer?, _ name: UnsafePointer<CChar>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let segment = CResult.string(name, "segment_name") else { return -1 }
    do {
        let id = try engine.openSegment(segment)
        try engine.refreshSegment(id)
        return id
    } catch { _ = CResult.errorCode(error); return -1 }
}

@_cdecl("closeSegment")
public func closeSegment(_ handle: UnsafeMutableRawPointer?, _ id: Int32) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    do { try engine.closeSegment(id); return 0 } catch { return CResult.errorCode(error) }
}

@_cdecl("syncSegmentCache")
public func syncSegmentCache(_ handle: UnsafeMutableRawPointer?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    do { try engine.refreshAllSegments(); return 0 } catch { return CResult.errorCode(error) }
}

@_cdecl("registerLocalMemory")
public func registerLocalMemory(_ handle: UnsafeMutableRawPointer?, _ address: UnsafeMutableRawPointer?, _ length: Int,
                                _ location: UnsafePointer<CChar>?, _ remoteAccessible: Int32) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let address, length > 0 else { CResult.fail("addr is NULL or length is 0"); return -1 }
    let where_ = location.flatMap { String(validatingCString: $0) } ?? "*"
    do {
        try engine.registerMemory(address: UInt64(UInt(bitPattern: address)), length: UInt64(length), location: where_)
        return 0
    } catch { return CResult.errorCode(error) }
}

@_cdecl("unregisterLocalMemory")
public func unregisterLocalMemory(_ handle: UnsafeMutableRawPointer?, _ address: UnsafeMutableRawPointer?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let address else { CResult.fail("addr is NULL"); return -1 }
    do { try engine.unregisterMemory(address: UInt64(UInt(bitPattern: address))); return 0 } catch { return CResult.errorCode(error) }
}

@_cdecl("registerLocalMemoryBatch")
public func registerLocalMemoryBatch(_ handle: UnsafeMutableRawPointer?, _ list: UnsafeMutablePointer<buffer_entry>?, _ count: Int,
                                     _ location: UnsafePointer<CChar>?) -> Int32 {
    guard HandleTable.lookup(handle) != nil else { CResult.fail("invalid engine handle"); return -1 }
    guard count >= 0, count <= 1 << 20, count == 0 || list != nil else { CResult.fail("buffer_list is NULL or buffer_len is too large"); return -1 }
    for i in 0..<count {
        let rc = registerLocalMemory(handle, list![i].addr, list![i].length, location, 1)
        if rc != 0 { return rc }
    }
    return 0
}

@_cdecl("unregisterLocalMemoryBatch")
public func unregisterLocalMemoryBatch(_ handle: UnsafeMutableRawPointer?, _ list: UnsafeMutablePointer<UnsafeMutableRawPointer?>?, _ count: Int) -> Int32 {
    guard HandleTable.lookup(handle) != nil else { CResult.fail("invalid engine handle"); return -1 }
    guard count >= 0, count <= 1 << 20, count == 0 || list != nil else { CResult.fail("addr_list is NULL or addr_len is too large"); return -1 }
    var first: Int32 = 0
    for i in 0..<count {
        let rc = unregisterLocalMemory(handle, list![i])
        if rc != 0, first == 0 { first = rc }
    }
    return first
}

@_cdecl("allocateBatchID")
public func allocateBatchID(_ handle: UnsafeMutableRawPointer?, _ size: Int) -> UInt64 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return UInt64.max }
    do { return try engine.allocateBatch(capacity: size) } catch { _ = CResult.errorCode(error); return UInt64.max }
}

/// Converts C requests to engine requests, validating the opcode and pointers.
func requests(_ entries: UnsafeMutablePointer<transfer_request>?, _ count: Int) throws -> [TransferRequest] {
    guard count >= 0, count <= 1 << 20 else { throw EngineError.invalidArgument("count \(count)") }
    guard count == 0 || entries != nil else { throw EngineError.invalidArgument("entries is NULL") }
    return try (0..<count).map { i in
        let entry = entries![i]
        guard let operation = TransferRequest.Operation(rawValue: entry.opcode) else {
            throw EngineError.invalidArgument("request \(i): opcode \(entry.opcode) (0 READ, 1 WRITE)")
        }
        return TransferRequest(operation: operation, localAddress: UInt64(UInt(bitPattern: entry.source)), segment: entry.target_id,
                               remoteAddress: entry.target_offset, length: entry.length)
    }
}

@_cdecl("submitTransfer")
public func submitTransfer(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64, _ entries: UnsafeMutablePointer<transfer_request>?, _ count: Int) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 1 }
    do {
        try engine.submit(try requests(entries, count), to: batch)
        return 0
    } catch { return CResult.statusCode(error) }
}

@_cdecl("submitTransferWithNotify")
public func submitTransferWithNotify(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64, _ entries: UnsafeMutablePointer<transfer_request>?,
                                     _ count: Int, _ notify: notify_msg) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 1 }
    guard let name = CResult.notificationText(notify.name, "notify_msg.name"), let message = CResult.notificationText(notify.msg, "notify_msg.msg") else { return 1 }
    do {
        let list = try requests(entries, count)
        guard let target = list.first?.segment, list.allSatisfy({ $0.segment == target }) else {
            throw EngineError.invalidArgument("a notified batch needs at least one request, all to the same segment")
        }
        try engine.submit(list, to: batch)
        try engine.notifyWhenDone(batch: batch, segment: target, notification: TransferNotification(name: name, message: message))
        return 0
    } catch { return CResult.statusCode(error) }
}

@_cdecl("getTransferStatus")
public func getTransferStatus(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64, _ task: Int, _ status: UnsafeMutablePointer<transfer_status>?) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 1 }
    guard let status else { CResult.fail("status is NULL"); return 1 }
    do {
        let result = try engine.status(batch: batch, task: task)
        status.pointee = transfer_status(status: result.state.rawValue, transferred_bytes: result.transferredBytes)
        if let error = result.error { CResult.fail(error) }
        return 0
    } catch { return CResult.statusCode(error) }
}

@_cdecl("freeBatchID")
public func freeBatchID(_ handle: UnsafeMutableRawPointer?, _ batch: UInt64) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return 1 }
    do { try engine.freeBatch(batch); return 0 } catch { return CResult.statusCode(error) }
}

@_cdecl("getNotifsFromEngine")
public func getNotifsFromEngine(_ handle: UnsafeMutableRawPointer?, _ size: UnsafeMutablePointer<Int32>?) -> UnsafeMutablePointer<notify_msg>? {
    size?.pointee = 0
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return nil }
    let notifications = engine.takeNotifications()
    guard !notifications.isEmpty,
          let array = malloc(MemoryLayout<notify_msg>.stride * notifications.count)?.bindMemory(to: notify_msg.self, capacity: notifications.count)
    else { return nil }
    for (i, notification) in notifications.enumerated() {
        array[i] = notify_msg(name: strdup(notification.name), msg: strdup(notification.message))
    }
    size?.pointee = Int32(notifications.count)
    return array
}

@_cdecl("freeNotifsMsgBuf")
public func freeNotifsMsgBuf(_ messages: UnsafeMutablePointer<notify_msg>?, _ size: Int32) -> Int32 {
    guard let messages else { return 0 }
    for i in 0..<max(0, Int(size)) {
        free(messages[i].name)
        free(messages[i].msg)
    }
    free(messages)
    return 0
}

@_cdecl("genNotifyInEngine")
public func genNotifyInEngine(_ handle: UnsafeMutableRawPointer?, _ target: UInt64, _ notify: notify_msg) -> Int32 {
    guard let engine = HandleTable.lookup(handle) else { CResult.fail("invalid engine handle"); return -1 }
    guard let name = CResult.notificationText(notify.name, "notify_msg.name"), let message = CResult.notificationText(notify.msg, "notify_msg.msg") else { return -1 }
    guard target <= UInt64(Int32.max) else { CResult.fail("target_id \(target) is not a segment id"); return -1 }
    do {
        try engine.sendNotification(TransferNotification(name: name, message: message), to: Int32(target))
        CResult.clear()
        return 0
    } catch {
        // As upstream: an unknown segment id or a peer that does not acknowledge is ERR_METADATA.
        CResult.fail("\(error)")
        return -200
    }
}
