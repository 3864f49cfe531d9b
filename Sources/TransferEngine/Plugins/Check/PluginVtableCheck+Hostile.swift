import CTransportABI
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Checks with hostile input, bad arguments, threads and teardown.
extension PluginVtableCheck {
    static func hostilePeerDescriptors(_ c: Context) -> PluginCheckResult {
        withInstance(c, "hostile peer descriptors") { v, instance, _ in
            // The plugin's own keys with wrong types: the fields it actually reads.
            let fragment = (try? JSONValue.parse(v.text { v.d.local_descriptor!(instance, $0) }.text))?.objectValue ?? [:]
            var buffer: [String: JSONValue] = [:]
            if let memory = aligned(4096) {
                let answer = v.text { out in "cpu:0".withCString { v.d.register_memory!(instance, UInt64(UInt(bitPattern: memory)), 4096, $0, out) } }
                buffer = (try? JSONValue.parse(answer.text))?.objectValue ?? [:]
                _ = v.d.unregister_memory!(instance, UInt64(UInt(bitPattern: memory)))
                free(memory)
            }
            let documents = HostileJSON.documents + HostileJSON.mutations(of: fragment, buffer: buffer)
            var opened = 0
            for document in documents {
                let (status, handle) = v.openPeer(instance, document)
                if status == TE_OK {
                    guard handle != 0 else { return PluginCheckResult("hostile peer descriptors", .failed("open_peer answered ok with the handle 0")) }
                    opened += 1
                    v.d.close_peer!(instance, handle)
                }
            }
            return PluginCheckResult("hostile peer descriptors", .passed,
                                     detail: "\(documents.count) descriptors (malformed, nested 100000 deep, wrong types for its own \(fragment.count + buffer.count) keys): \(opened) opened, none crashed")
        }
    }

    static func hostileHandshakes(_ c: Context) -> PluginCheckResult {
        withInstance(c, "hostile handshakes") { v, instance, _ in
            var answered = 0
            for document in HostileJSON.documents {
                let answer = v.text { out in document.withCString { v.d.on_handshake!(instance, $0, out) } }
                if answer.status == TE_OK {
                    answered += 1
                    guard answer.text.isEmpty || (try? JSONValue.parse(answer.text)) != nil else {
                        return PluginCheckResult("hostile handshakes", .failed("on_handshake answered ok with text that is not JSON: \(answer.text.prefix(80))"))
                    }
                }
            }
            return PluginCheckResult("hostile handshakes", .passed, detail: "\(HostileJSON.documents.count) requests: \(answered) answered with JSON, \(HostileJSON.documents.count - answered) refused, none crashed")
        }
    }

    static func submitAndPollArguments(_ c: Context) -> PluginCheckResult {
        withInstance(c, "submit and poll arguments") { v, instance, _ in
            let name = "submit and poll arguments"
            let unknown = te_request(opcode: TE_OP_WRITE, flags: 0, local_addr: 0x1000, peer: 0xDEAD_BEEF, remote_addr: 0x1000, length: 8, cookie: 7)
            var (status, accepted) = v.submit(instance, [unknown])
            guard status != TE_OK, accepted == 0 else {
                return PluginCheckResult(name, .failed("a request to an unknown peer handle answered \(PluginStatus.describe(status)) with \(accepted) accepted; expected an error and 0"))
            }
            (status, accepted) = v.submit(instance, [unknown], stride: 8)
            guard status == TE_ERR_INVALID_ARGUMENT else {
                return PluginCheckResult(name, .failed("a stride of 8 bytes (below sizeof(te_request)) answered \(PluginStatus.describe(status))"))
            }
            (status, accepted) = v.submit(instance, [])
            guard status == TE_OK, accepted == 0 else {
                return PluginCheckResult(name, .failed("an empty submit answered \(PluginStatus.describe(status)) with \(accepted) accepted"))
            }
            var count = -1
            var completions = [te_completion](repeating: te_completion(), count: 4)
            status = completions.withUnsafeMutableBufferPointer { v.d.poll!(instance, $0.baseAddress, 0, MemoryLayout<te_completion>.stride, 0, &count) }
            guard status == TE_OK, count == 0 else {
                return PluginCheckResult(name, .failed("poll with capacity 0 answered \(PluginStatus.describe(status)), count \(count)"))
            }
            let began = MonotonicClock.nanoseconds()
            status = completions.withUnsafeMutableBufferPointer { v.d.poll!(instance, $0.baseAddress, 4, MemoryLayout<te_completion>.stride, 20_000_000, &count) }
            let waited = (MonotonicClock.nanoseconds() - began) / 1_000_000
            guard status == TE_OK, count == 0 else {
                return PluginCheckResult(name, .failed("poll with nothing submitted answered \(PluginStatus.describe(status)), count \(count)"))
            }
            guard waited < 1000 else { return PluginCheckResult(name, .failed("poll with a 20 ms timeout returned after \(waited) ms")) }
            return PluginCheckResult(name, .passed, detail: "unknown peer, short stride and empty submit answered right; an idle poll(20 ms) returned in \(waited) ms")
        }
    }

    static func lastErrorPerThread(_ c: Context) -> PluginCheckResult {
        withInstance(c, "last_error per thread") { v, instance, _ in
            let name = "last_error per thread"
            // Thread A fails a submit and reads its error; thread B then fails differently; A's text must not change.
            let first = ConditionLock<(a: String?, b: String?, stage: Int)>((nil, nil, 0))
            let pointer = UInt(bitPattern: instance)
            let started: Void? = try? OSThread.spawn(name: "te-check-a") {
                let instance = OpaquePointer(bitPattern: pointer)!
                let bad = te_request(opcode: TE_OP_READ, flags: 0, local_addr: 0x1000, peer: 0xAAAA_AAAA, remote_addr: 0x1000, length: 8, cookie: 1)
                _ = v.submit(instance, [bad])
                let before = v.lastError(instance)
                first.withLock(notify: true) { $0.a = before; $0.stage = 1 }
                _ = first.wait(deadline: MonotonicClock.nanoseconds() + 10_000_000_000, until: { $0.stage == 2 ? true : nil })
                let after = v.lastError(instance)
                first.withLock(notify: true) { $0.a = before == after ? before : "CHANGED: '\(before ?? "")' became '\(after ?? "")'"; $0.stage = 3 }
            }
            guard started != nil else { return PluginCheckResult(name, .skipped("cannot start a thread")) }
            guard first.wait(deadline: MonotonicClock.nanoseconds() + 10_000_000_000, until: { $0.stage == 1 ? true : nil }) != nil else {
                return PluginCheckResult(name, .failed("a failed submit did not return within 10 s"))
            }
            _ = v.openPeer(instance, "{\"not a descriptor\"")
            let b = v.lastError(instance)
            first.withLock(notify: true) { $0.b = b; $0.stage = 2 }
            _ = first.wait(deadline: MonotonicClock.nanoseconds() + 10_000_000_000, until: { $0.stage == 3 ? true : nil })
            let (a, _, _) = first.withLock { $0 }
            guard let a, !a.isEmpty else { return PluginCheckResult(name, .failed("last_error after a failed submit was \(a == nil ? "NULL" : "empty")")) }
            guard !a.hasPrefix("CHANGED") else { return PluginCheckResult(name, .failed("a failure on another thread changed this thread's last_error: \(a)")) }
            return PluginCheckResult(name, .passed, detail: "thread A: '\(a.prefix(60))'; thread B: '\((b ?? "NULL").prefix(60))'")
        }
    }

    static func silentAfterDestroy(_ c: Context) -> PluginCheckResult {
        let name = "no host call after destroy"
        if let why = c.instanceSkip { return PluginCheckResult(name, .skipped(why)) }
        let v = c.vtable!
        let host = CheckHost()
        let (status, instance) = v.create(c.options, host)
        guard status == TE_OK, let instance else { return PluginCheckResult(name, .failed("create answered \(PluginStatus.describe(status))")) }
        // Work that leaves threads behind: a registration, a failing open_peer (it may try a handshake).
        if let memory = aligned(1 << 20) {
            _ = v.text { out in "cpu:0".withCString { v.d.register_memory!(instance, UInt64(UInt(bitPattern: memory)), 1 << 20, $0, out) } }
            _ = v.openPeer(instance, "{\"name\":\"x\",\"protocol\":\"x\",\"tcp_data_port\":1,\"buffers\":[]}")
            v.d.destroy!(instance)
            host.destroyed.store(true, ordering: .releasing)
            free(memory)
        } else {
            v.d.destroy!(instance)
            host.destroyed.store(true, ordering: .releasing)
        }
        usleep(300_000)
        let late = host.callsAfterDestroy.load(ordering: .relaxed)
        guard late == 0 else { return PluginCheckResult(name, .failed("\(late) calls into the host services came after destroy returned")) }
        return PluginCheckResult(name, .passed, detail: "no log, clock or handshake call in the 300 ms after destroy returned")
    }
}
