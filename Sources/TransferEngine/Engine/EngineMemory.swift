#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Registrations: every buffer is registered with every installed transport, and the
/// published descriptor carries each transport's keys for it.
extension TransferEngine {
    /// The descriptor key under which a transport other than the first keeps its fields
    /// (segment level and per buffer); the first transport's fields stay where upstream puts them.
    static let transportFieldsKey = "te_transports"

    /// Registers [address, address+length) so peers may read and write it, with every transport.
    /// `location` is Mooncake's memory location ("cpu:0", "cuda:1", "*").
    public func registerMemory(address: UInt64, length: UInt64, location: String = "*") throws {
        try membership.withLock { _ in
            try registry.register(address: address, length: length, location: location)
            let transports = state.withLock { state -> [any Transport] in
                state.registrationGeneration += 1
                return state.transports
            }
            var registered: [any Transport] = []
            do {
                for transport in transports where !(transport is TCPTransport) {
                    let fragment = try transport.register(address: address, length: length, location: location)
                    registered.append(transport)
                    state.withLock { $0.bufferFragments[address, default: [:]][transport.protocolName] = fragment }
                }
            } catch {
                // Lose nothing: a registration peers cannot see is rolled back.
                _ = try? registry.unregister(address: address)
                state.withLock { _ = $0.bufferFragments.removeValue(forKey: address) }
                for transport in registered { try? transport.unregister(address: address) }
                throw error
            }
        }
        do { try republishDescriptor() } catch {
            try? unregisterLocally(address: address)
            throw error
        }
        prebuildDescriptorText()
    }

    /// Builds the descriptor's text now when it is kept and small (TCP only, at most 64 buffers),
    /// so a peer's first fetch, and this engine's own first fetch request, find it built.
    private func prebuildDescriptorText() {
        _ = inlineDescriptorText(maxBuffers: 64)
    }

    /// Unregisters from the registry and every transport (membership held).
    private func unregisterLocally(address: UInt64) throws {
        try membership.withLock { _ in
            // The kept descriptor text goes stale now (its generation moved), so it stops listing
            // the buffer before the wait for peers' access below, not after it.
            state.withLock { $0.registrationGeneration += 1 }
            try registry.unregister(address: address)
            let transports = state.withLock { state -> [any Transport] in
                state.registrationGeneration += 1
                _ = state.bufferFragments.removeValue(forKey: address)
                return state.transports
            }
            var firstError: Error?
            for transport in transports {
                do { try transport.unregister(address: address) } catch { if firstError == nil { firstError = error } }
            }
            if let firstError { throw firstError }
        }
    }

    /// Unregisters the buffer starting at `address`; returns after in-flight peer access to it ended.
    public func unregisterMemory(address: UInt64) throws {
        var failure: Error?
        do { try unregisterLocally(address: address) } catch let error as EngineError {
            guard case .plugin = error else { throw error }  // not registered: nothing happened
            failure = error
        }
        prebuildDescriptorText()
        do { try republishDescriptor() } catch {
            logger.warning("unregistered 0x\(String(address, radix: 16)) locally; publishing the descriptor failed (retried by the refresh): \(error)")
        }
        if let failure { throw failure }
    }

    /// Allocates memory and registers it; free it with `freeManagedBuffer`. A transport with
    /// memory of its own (a CXL pool, a GPU plugin for `cuda:N`) provides it, the first in
    /// routing order that does; otherwise page-aligned heap memory.
    public func allocateManagedBuffer(length: UInt64, location: String = "cpu:0") throws -> UInt64 {
        guard length > 0, length < UInt64(Int.max) else { throw EngineError.invalidArgument("managed buffer length \(length)") }
        var address: UInt64 = 0
        var from: String?
        for transport in state.withLock({ $0.transports }) {
            if let provided = try transport.allocate(length: length, location: location) {
                (address, from) = (provided, transport.protocolName)
                break
            }
        }
        if from == nil {
            guard MemoryLocation.isHostAccessible(location) else {
                throw EngineError.invalidArgument("managed buffers at \(location) need a transport that allocates device memory "
                    + "(nvlink, nvlink_intra, hip, rdma for cuda:N); \(Self.describeList(activeProtocols)). Allocate the memory "
                    + "with the device's runtime and register it with location \(location) instead")
            }
            var pointer: UnsafeMutableRawPointer?
            let rc = posix_memalign(&pointer, 4096, Int(length))
            guard rc == 0, let pointer else { throw EngineError.system(call: "posix_memalign(\(length))", errno: rc) }
            address = UInt64(UInt(bitPattern: pointer))
        }
        do { try registerMemory(address: address, length: length, location: location) } catch {
            try? releaseManaged(address: address, from: from)
            throw error
        }
        state.withLock { $0.managed[address] = (length, from) }
        return address
    }

    /// "protocol shm does not" / "protocols rdma,nvmeof do not" (tcp named only when alone).
    static func describeList(_ protocols: [String]) -> String {
        let plugins = protocols.filter { $0 != "tcp" }
        if plugins.count > 1 { return "protocols \(plugins.joined(separator: ",")) do not" }
        return "protocol \(plugins.first ?? "tcp") does not"
    }

    /// Returns managed memory to where it came from (a transport or the heap).
    private func releaseManaged(address: UInt64, from: String?) throws {
        guard let from else {
            free(UnsafeMutableRawPointer(bitPattern: UInt(address)))
            return
        }
        try transport(named: from)?.free(address: address)
    }

    /// Unregisters and frees a managed buffer. When a transport cannot unregister it, it is
    /// neither freed nor forgotten (a NIC may still reach it) and the error says why.
    public func freeManagedBuffer(address: UInt64) throws {
        guard let managed = state.withLock({ $0.managed.removeValue(forKey: address) }) else {
            throw EngineError.invalidArgument("0x\(String(address, radix: 16)) is not a managed buffer")
        }
        do { try unregisterMemory(address: address) } catch {
            state.withLock { $0.managed[address] = managed }
            throw error
        }
        try releaseManaged(address: address, from: managed.from)
    }

    /// The descriptor this engine publishes. The first installed transport's fields are where
    /// upstream puts them (an official peer reads them); each other transport's are under
    /// `te_transports.<protocol>`, and `protocols` lists every transport when there are several.
    public var localDescriptor: SegmentDescriptor { describe(builtInOnly: false)! }

    /// The descriptor as compact JSON, as peers fetch it over the handshake port (the metadata
    /// server is given a fresh build, with the current `timestamp`).
    var localDescriptorText: String { describedText(builtInOnly: false)! }

    /// What the handshake port's I/O thread answers a descriptor fetch with: nil when a plugin is
    /// installed or more than `maxBuffers` buffers are registered (see `describe`).
    func inlineDescriptorText(maxBuffers: Int) -> String? { describedText(builtInOnly: true, maxBuffers: maxBuffers) }

    /// The descriptor's text. A TCP-only engine keeps it until a registration or the installed
    /// transports change (the generations it was built at), so a first contact's descriptor fetch
    /// describes nothing on either side; with a plugin installed it is built every time (a
    /// plugin's fields are its own to change). Its `timestamp` is then the time of that build.
    private func describedText(builtInOnly: Bool, maxBuffers: Int = .max) -> String? {
        let (key, kept) = state.withLock { state -> (DescriptorText.Key?, DescriptorText?) in
            guard state.transports.allSatisfy({ $0 is TCPTransport }) else { return (nil, nil) }
            return (.init(registrations: state.registrationGeneration, routes: state.routeGeneration), state.descriptorText)
        }
        if let key, let kept, kept.key == key {
            return kept.buffers <= maxBuffers ? kept.text : nil
        }
        guard let descriptor = describe(builtInOnly: builtInOnly, maxBuffers: maxBuffers) else { return nil }
        let text = descriptor.json.compactText
        if let key {
            // Kept only if nothing changed while it was built (a registration bumps its generation
            // after the registry changes, so a build that missed it is never kept past the bump).
            state.withLock { state in
                if state.registrationGeneration == key.registrations, state.routeGeneration == key.routes {
                    state.descriptorText = DescriptorText(key: key, buffers: descriptor.buffers.count, text: text)
                }
            }
        }
        return text
    }

    /// The descriptor; with `builtInOnly`, nil when a plugin is installed (describing then calls
    /// into it, which may block) or more than `maxBuffers` buffers are registered.
    func describe(builtInOnly: Bool, maxBuffers: Int = .max) -> SegmentDescriptor? {
        let (fragments, transports) = state.withLock { ($0.bufferFragments, $0.transports) }
        if builtInOnly && !transports.allSatisfy({ $0 is TCPTransport }) { return nil }
        guard let regions = registry.all(atMost: maxBuffers) else { return nil }
        let primary = transports.first!
        let usePlugin = !(primary is TCPTransport)
        let installedNames = Set(transports.map(\.protocolName))
        var extra: [String: JSONValue] = [:]
        var served: [SegmentDescriptor.Buffer] = []
        var others: [String: JSONValue] = [:]
        for transport in transports where !(transport is TCPTransport) {
            var fragment = (try? transport.localDescriptorFragment()) ?? [:]
            let isPrimary = transport === primary
            // Ranges a transport itself serves (e.g. NVMe namespaces) are listed after the registered
            // memory; an entry peers would refuse (and with it the whole descriptor) is left out.
            for (index, entry) in (fragment.removeValue(forKey: "buffers")?.arrayValue ?? []).enumerated() {
                guard var buffer = try? SegmentDescriptor.Buffer.decode(entry, index: index) else { continue }
                if !isPrimary && buffer.ownProtocol == nil { buffer.extra["protocol"] = .string(transport.protocolName) }
                served.append(buffer)
            }
            if isPrimary { extra = fragment } else if !fragment.isEmpty { others[transport.protocolName] = .object(fragment) }
        }
        if !others.isEmpty { extra[Self.transportFieldsKey] = .object(others) }
        if transports.count > 2 { extra["protocols"] = .array(transports.map { .string($0.protocolName) }) }
        let buffers = regions.map { region in
            let perTransport = fragments[region.address] ?? [:]
            var keys = perTransport[primary.protocolName] ?? [:]
            var secondary: [String: JSONValue] = [:]
            for (name, fragment) in perTransport where name != primary.protocolName && !fragment.isEmpty && installedNames.contains(name) {
                secondary[name] = .object(fragment)
            }
            if !secondary.isEmpty { keys[Self.transportFieldsKey] = .object(secondary) }
            return SegmentDescriptor.Buffer(name: usePlugin ? region.location : segmentName, address: region.address,
                                            length: region.length, extra: keys)
        }
        return SegmentDescriptor(name: segmentName, protocolName: primary.protocolName, tcpDataPort: dataPort,
                                 buffers: buffers + served, extra: extra)
    }
}

extension SegmentDescriptor {
    /// The descriptor as transport `protocolName` reads it. The publisher's first transport sees
    /// it as published (less `te_transports`). Any other transport sees only its own fields
    /// (from `te_transports.<protocol>`, at segment level and per buffer) besides the standard
    /// ones: never another transport's keys under its name. Buffers that name another protocol
    /// are left out.
    func view(for protocolName: String) -> SegmentDescriptor {
        var view = self
        let key = TransferEngine.transportFieldsKey
        let isPrimary = protocolName == self.protocolName
        if isPrimary {
            view.extra.removeValue(forKey: key)
        } else {
            view.protocolName = protocolName
            view.extra = extra[key]?[protocolName]?.objectValue ?? [:]
        }
        view.buffers = buffers.compactMap { buffer in
            if let own = buffer.ownProtocol, own != protocolName { return nil }
            var copy = buffer
            if isPrimary || buffer.ownProtocol == protocolName {
                // Its keys are this transport's own (a range the transport serves names it).
                if buffer.extra[key] != nil { copy.extra.removeValue(forKey: key) }
            } else {
                copy.extra = buffer.extra[key]?[protocolName]?.objectValue ?? [:]
            }
            return copy
        }
        return view
    }
}

/// A descriptor's text and the generations it was built at.
struct DescriptorText: Sendable {
    /// The registration and route generations of `TransferEngine.State`.
    struct Key: Equatable, Sendable {
        var registrations: UInt64
        var routes: UInt64
    }
    /// The generations it was built at.
    var key: Key
    /// How many buffers it lists.
    var buffers: Int
    /// The compact JSON.
    var text: String
}
