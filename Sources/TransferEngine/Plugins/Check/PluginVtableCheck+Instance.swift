import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Checks on live instances: create/destroy, fragments, registration, answers that do not fit.
extension PluginVtableCheck {
    /// Keys of the segment descriptor that the host writes; a fragment must not carry them.
    static let hostKeys: Set<String> = ["name", "protocol", "tcp_data_port", "tcp_proto_version", "timestamp"]
    /// Keys of a buffer entry that the host writes.
    static let hostBufferKeys: Set<String> = ["name", "addr", "length"]

    /// Runs `body` with a fresh instance (destroyed afterwards), or returns why there is none.
    static func withInstance(_ c: Context, _ name: String, _ body: (CheckedVtable, OpaquePointer, CheckHost) -> PluginCheckResult) -> PluginCheckResult {
        if let why = c.instanceSkip { return PluginCheckResult(name, .skipped(why)) }
        let v = c.vtable!
        let host = CheckHost()
        let (status, instance) = v.create(c.options, host)
        guard status == TE_OK, let instance else {
            return PluginCheckResult(name, .failed("create answered \(PluginStatus.describe(status))\(instance == nil && status == TE_OK ? " with no instance" : "") although probe said ok"))
        }
        let result = body(v, instance, host)
        v.d.destroy!(instance)
        host.destroyed.store(true, ordering: .releasing)
        return result
    }

    static func createDestroy(_ c: Context) -> PluginCheckResult {
        if let why = c.instanceSkip { return PluginCheckResult("create and destroy, three times", .skipped(why)) }
        let v = c.vtable!
        var took: [String] = []
        for round in 1...3 {
            let host = CheckHost()
            let began = MonotonicClock.nanoseconds()
            let (status, instance) = v.create(c.options, host)
            guard status == TE_OK, let instance else {
                return PluginCheckResult("create and destroy, three times", .failed("create \(round) answered \(PluginStatus.describe(status))"))
            }
            v.d.destroy!(instance)
            took.append("\((MonotonicClock.nanoseconds() - began) / 1_000_000) ms")
        }
        return PluginCheckResult("create and destroy, three times", .passed, detail: "create+destroy took \(took.joined(separator: ", "))")
    }

    static func createOddOptions(_ c: Context) -> PluginCheckResult {
        if let why = c.instanceSkip { return PluginCheckResult("create with odd options", .skipped(why)) }
        let v = c.vtable!
        var created = 0
        for options in HostileJSON.options {
            let host = CheckHost()
            let (status, instance) = v.create(options, host)
            if status == TE_OK, let instance {
                created += 1
                v.d.destroy!(instance)
            } else if status == TE_OK {
                return PluginCheckResult("create with odd options", .failed("create answered ok without an instance"))
            }
        }
        return PluginCheckResult("create with odd options", .passed,
                                 detail: "\(HostileJSON.options.count) odd option texts: \(created) created an instance (with defaults), \(HostileJSON.options.count - created) refused")
    }

    static func localDescriptor(_ c: Context) -> PluginCheckResult {
        withInstance(c, "local descriptor") { v, instance, _ in
            let answer = v.text { v.d.local_descriptor!(instance, $0) }
            guard answer.status == TE_OK else { return PluginCheckResult("local descriptor", .failed("local_descriptor answered \(PluginStatus.describe(answer.status))")) }
            guard let object = (try? JSONValue.parse(answer.text))?.objectValue else {
                return PluginCheckResult("local descriptor", .failed("its fragment is not a JSON object: \(answer.text.prefix(120))"))
            }
            if let clash = object.keys.first(where: hostKeys.contains) {
                return PluginCheckResult("local descriptor", .failed("its fragment sets '\(clash)', which the host writes"))
            }
            if let buffers = object["buffers"] {
                guard let list = buffers.arrayValue, list.allSatisfy({ entry in
                    entry["name"]?.stringValue?.isEmpty == false && (entry["addr"]?.uint64Value ?? 0) != 0 && (entry["length"]?.uint64Value ?? 0) != 0
                }) else {
                    return PluginCheckResult("local descriptor", .failed("its 'buffers' must be an array of objects with name, addr and length"))
                }
            }
            // ABI 1.2 `stats`, where offered: a {"devices": [...]} object, or "none kept".
            var statsNote = "; no stats entry"
            if let stats = v.d.stats {
                let figures = v.text { stats(instance, $0) }
                if figures.status == TE_ERR_NOT_SUPPORTED {
                    statsNote = "; stats: none kept"
                } else {
                    guard figures.status == TE_OK, let devices = (try? JSONValue.parse(figures.text))?["devices"]?.arrayValue,
                          devices.allSatisfy({ $0["name"]?.stringValue?.isEmpty == false }) else {
                        return PluginCheckResult("local descriptor", .failed("stats answered \(PluginStatus.describe(figures.status)) with '\(figures.text.prefix(120))', "
                                                 + "not {\"devices\":[{\"name\":...}]}"))
                    }
                    statsNote = "; stats: \(devices.count) device(s)"
                }
            }
            return PluginCheckResult("local descriptor", .passed, detail: "keys: \(object.keys.sorted().joined(separator: ", "))\(statsNote)")
        }
    }

    static func registerUnregister(_ c: Context) -> PluginCheckResult {
        withInstance(c, "register and unregister") { v, instance, _ in
            let length = 1 << 20
            guard let memory = aligned(length) else { return PluginCheckResult("register and unregister", .skipped("no memory")) }
            defer { free(memory) }
            let address = UInt64(UInt(bitPattern: memory))
            var keys: [String] = []
            for round in 1...2 {
                let answer = v.text { out in "cpu:0".withCString { v.d.register_memory!(instance, address, UInt64(length), $0, out) } }
                guard answer.status == TE_OK else {
                    return PluginCheckResult("register and unregister", .failed("register_memory of 1 MiB of host memory answered \(PluginStatus.describe(answer.status)): \(v.lastError(instance) ?? "")"))
                }
                guard let object = (try? JSONValue.parse(answer.text.isEmpty ? "{}" : answer.text))?.objectValue else {
                    return PluginCheckResult("register and unregister", .failed("its fragment is not a JSON object: \(answer.text.prefix(120))"))
                }
                if let clash = object.keys.first(where: hostBufferKeys.contains) {
                    return PluginCheckResult("register and unregister", .failed("its buffer fragment sets '\(clash)', which the host writes"))
                }
                keys = object.keys.sorted()
                let status = v.d.unregister_memory!(instance, address)
                guard status == TE_OK else {
                    return PluginCheckResult("register and unregister", .failed("unregister_memory of a registered buffer answered \(PluginStatus.describe(status)) (round \(round))"))
                }
            }
            _ = v.d.unregister_memory!(instance, address &+ 12345)  // never registered: any answer, no crash
            return PluginCheckResult("register and unregister", .passed, detail: "registered twice, fragment keys: \(keys.isEmpty ? "none" : keys.joined(separator: ", "))")
        }
    }

    static func answersThatDoNotFit(_ c: Context) -> PluginCheckResult {
        withInstance(c, "answers that do not fit") { v, instance, _ in
            let full = v.text { v.d.local_descriptor!(instance, $0) }
            let small = v.text(capacity: 1) { v.d.local_descriptor!(instance, $0) }
            guard full.text.utf8.count == 0 || (small.status == TE_ERR_BUFFER_TOO_SMALL && small.length == full.text.utf8.count) else {
                return PluginCheckResult("answers that do not fit", .failed("local_descriptor into 1 byte answered \(PluginStatus.describe(small.status)) with length \(small.length); expected buffer too small with \(full.text.utf8.count)"))
            }
            let length = 64 << 10
            guard let memory = aligned(length) else { return PluginCheckResult("answers that do not fit", .skipped("no memory")) }
            defer { free(memory) }
            let address = UInt64(UInt(bitPattern: memory))
            let tiny = v.text(capacity: 1) { out in "cpu:0".withCString { v.d.register_memory!(instance, address, UInt64(length), $0, out) } }
            if tiny.status == TE_ERR_BUFFER_TOO_SMALL {
                // The host asks again with room for `length` bytes; that must succeed as a first register would.
                let retry = v.text(capacity: tiny.length + 1) { out in "cpu:0".withCString { v.d.register_memory!(instance, address, UInt64(length), $0, out) } }
                guard retry.status == TE_OK, retry.text.utf8.count == tiny.length else {
                    return PluginCheckResult("answers that do not fit", .failed("register_memory retried with \(tiny.length + 1) bytes answered \(PluginStatus.describe(retry.status)), \(retry.text.utf8.count) bytes"))
                }
            } else if tiny.status != TE_OK {
                return PluginCheckResult("answers that do not fit", .failed("register_memory into 1 byte answered \(PluginStatus.describe(tiny.status))"))
            }
            _ = v.d.unregister_memory!(instance, address)
            return PluginCheckResult("answers that do not fit", .passed, detail: "1-byte buffers: full lengths reported, the retry succeeded")
        }
    }

    static func aligned(_ length: Int) -> UnsafeMutableRawPointer? {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, length) == 0, let memory else { return nil }
        memset(memory, 0x5A, length)
        return memory
    }
}
