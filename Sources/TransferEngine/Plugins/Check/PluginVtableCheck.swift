import CTransportABI

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The checks of `plugins --check` that call a plugin's C vtable directly, in this process: how it
/// loads, its ABI declarations, probe, create/destroy, descriptor fragments, registration, hostile
/// input, argument checks, per-thread `last_error`, and silence after `destroy`. A plugin that
/// crashes takes this process with it, so the checker runs these in a child process and starts it
/// again after the check that crashed (`run(from:)`).
public enum PluginVtableCheck {
    /// The checks, in order.
    public static let names = [
        "loads", "entry symbol", "abi version", "descriptor entries", "name and protocols", "probe", "probe with odd options",
        "probe answers that do not fit", "create and destroy, three times", "create with odd options", "local descriptor",
        "register and unregister", "answers that do not fit", "hostile peer descriptors", "hostile handshakes",
        "submit and poll arguments", "last_error per thread", "no host call after destroy",
    ]

    /// What the checks share: the loaded plugin, the protocol checked, the options create gets, and probe's verdict.
    final class Context {
        let path: String
        let protocolName: String
        let options: String
        var handle: UnsafeMutableRawPointer?
        var raw: UnsafeRawPointer?
        var loaded: LoadedPlugin?
        var loadFailure: String?
        var probe: (status: Int32, reason: String, hint: String)?

        init(path: String, protocolName: String, options: String) {
            self.path = path
            self.protocolName = protocolName
            self.options = options
        }

        var vtable: CheckedVtable? { loaded.map { CheckedVtable(d: $0.descriptor.pointee) } }

        /// Why checks needing an instance cannot run, or nil.
        var instanceSkip: String? {
            guard loaded != nil else { return "the plugin did not load" }
            guard let probe else { return "probe was not called" }
            guard probe.status == TE_OK else {
                return "probe answered \(PluginStatus.describe(probe.status)) (see probe)"
            }
            return nil
        }
    }

    /// Runs the checks from index `start` (the ones before it only to learn what later ones need),
    /// calling `begin` before each and `emit` with each result.
    /// `chosen` gets the protocol checked (the requested one, else the one the file is named after
    /// if it serves it, else the first it declares) once the plugin has loaded.
    public static func run(path: String, protocolName: String?, options: (String) -> String, from start: Int = 0,
                           begin: (Int) -> Void = { _ in }, emit: (Int, PluginCheckResult) -> Void, chosen: (String) -> Void = { _ in }) {
        let context = Context(path: path, protocolName: protocolName ?? "", options: "")
        var protocolChosen = protocolName
        let steps: [(Context) -> PluginCheckResult] = [
            loads, entrySymbol, abiVersion, descriptorEntries, { c in
                let result = namesAndProtocols(c, requested: protocolName)
                if protocolChosen == nil, let declared = c.loaded?.info.protocols {
                    let named = PluginCatalog.protocolName(ofFile: path)
                    protocolChosen = named.flatMap { declared.contains($0) ? $0 : nil } ?? declared.first
                }
                return result
            },
        ]
        for (index, step) in steps.enumerated() {
            if index >= start { begin(index) }
            let result = step(context)
            if index >= start { emit(index, result) }
        }
        if let protocolChosen { chosen(protocolChosen) }
        let checked = Context(path: path, protocolName: protocolChosen ?? "", options: options(protocolChosen ?? ""))
        (checked.handle, checked.raw, checked.loaded, checked.loadFailure) = (context.handle, context.raw, context.loaded, context.loadFailure)
        let later: [(Context) -> PluginCheckResult] = [
            probeAnswers, probeOddOptions, probeSmallBuffers, createDestroy, createOddOptions, localDescriptor, registerUnregister,
            answersThatDoNotFit, hostilePeerDescriptors, hostileHandshakes, submitAndPollArguments, lastErrorPerThread, silentAfterDestroy,
        ]
        for (offset, step) in later.enumerated() {
            let index = steps.count + offset
            // Probe runs always: later checks depend on its verdict.
            guard index >= start || offset == 0 else { continue }
            if index >= start { begin(index) }
            let result = step(checked)
            if index >= start { emit(index, result) }
        }
    }

    // MARK: Loading and declarations

    static func loads(_ c: Context) -> PluginCheckResult {
        guard let handle = dlopen(c.path, RTLD_NOW | RTLD_LOCAL) else {
            let message = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            c.loadFailure = PluginLoader.explainDlopenFailure(message, path: c.path)
            return PluginCheckResult("loads", .failed(c.loadFailure!))
        }
        c.handle = handle
        return PluginCheckResult("loads", .passed, detail: "dlopen(RTLD_NOW | RTLD_LOCAL) resolved every symbol")
    }

    static func entrySymbol(_ c: Context) -> PluginCheckResult {
        guard let handle = c.handle else { return PluginCheckResult("entry symbol", .skipped("the file did not load")) }
        guard let symbol = dlsym(handle, TE_PLUGIN_ENTRY_SYMBOL) else {
            return PluginCheckResult("entry symbol", .failed("it does not export '\(TE_PLUGIN_ENTRY_SYMBOL)'"))
        }
        guard let descriptor = unsafeBitCast(symbol, to: te_plugin_entry_fn.self)() else {
            return PluginCheckResult("entry symbol", .failed("'\(TE_PLUGIN_ENTRY_SYMBOL)' returned NULL"))
        }
        c.raw = UnsafeRawPointer(descriptor)
        return PluginCheckResult("entry symbol", .passed, detail: "'\(TE_PLUGIN_ENTRY_SYMBOL)' returns a descriptor")
    }

    static func abiVersion(_ c: Context) -> PluginCheckResult {
        guard let raw = c.raw else { return PluginCheckResult("abi version", .skipped("no descriptor")) }
        let major = raw.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
        let minor = raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
        let size = Int(raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        let v1 = MemoryLayout<te_plugin_descriptor>.offset(of: \te_plugin_descriptor.last_error)! + MemoryLayout<UnsafeRawPointer>.size
        let current = MemoryLayout<te_plugin_descriptor>.size
        let seen = "ABI \(major).\(minor), descriptor of \(size) bytes (this host: \(TE_ABI_MAJOR).\(TE_ABI_MINOR), \(current) bytes)"
        // The host's own verdict first, so the checks after this one see what the engine would load.
        switch PluginLoader.load(path: c.path) {
        case .success(let loaded): c.loaded = loaded
        case .failure(let error): c.loadFailure = error.reason
        }
        guard major == TE_ABI_MAJOR else { return PluginCheckResult("abi version", .failed("ABI major \(major) is not this host's \(TE_ABI_MAJOR)"), detail: seen) }
        guard size >= v1 else { return PluginCheckResult("abi version", .failed("the descriptor is smaller than the ABI 1.0 minimum of \(v1) bytes"), detail: seen) }
        // Each minor appends fields: a plugin built against this host's minor has this host's size.
        if minor == TE_ABI_MINOR && size != current {
            return PluginCheckResult("abi version", .failed("ABI \(major).\(minor) descriptors are \(current) bytes, this one says \(size): struct_size must be sizeof(te_plugin_descriptor)"), detail: seen)
        }
        if minor < TE_ABI_MINOR && size >= current {
            return PluginCheckResult("abi version", .failed("an ABI \(major).\(minor) descriptor cannot hold this host's \(current) bytes"), detail: seen)
        }
        return PluginCheckResult("abi version", .passed, detail: minor > TE_ABI_MINOR ? "\(seen); newer minor: this host reads its first \(current) bytes" : seen)
    }

    static func descriptorEntries(_ c: Context) -> PluginCheckResult {
        guard let loaded = c.loaded else {
            return c.raw == nil ? PluginCheckResult("descriptor entries", .skipped("no descriptor"))
                : PluginCheckResult("descriptor entries", .failed(c.loadFailure ?? "the host refused the descriptor"))
        }
        let d = loaded.descriptor.pointee
        if (d.allocate_memory == nil) != (d.free_memory == nil) {
            return PluginCheckResult("descriptor entries", .failed("allocate_memory and free_memory must come together (one is NULL)"))
        }
        return PluginCheckResult("descriptor entries", .passed, detail: "every required entry is set\(loaded.allocatesMemory ? "; allocates memory" : "")")
    }

    static func namesAndProtocols(_ c: Context, requested: String?) -> PluginCheckResult {
        guard let info = c.loaded?.info else { return PluginCheckResult("name and protocols", .skipped("the plugin did not load")) }
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789_")
        if let bad = info.protocols.first(where: { $0.isEmpty || !$0.allSatisfy(allowed.contains) }) {
            return PluginCheckResult("name and protocols", .failed("protocol '\(bad)' is not a lower-case name (a-z, 0-9, _)"))
        }
        if info.protocols.contains("tcp") { return PluginCheckResult("name and protocols", .failed("'tcp' is the engine's own transport")) }
        if let requested, !info.protocols.contains(requested) {
            return PluginCheckResult("name and protocols", .failed("it does not serve '\(requested)' (it declares \(info.protocols.joined(separator: ",")))"))
        }
        let named = PluginCatalog.protocolName(ofFile: c.path).map(info.protocols.contains) ?? false
        let note = named ? "" : "; install it as libtransport_<protocol>.so so the engine finds it"
        let memory = info.capabilities & (TE_CAP_MEM_HOST | TE_CAP_MEM_DEVICE | TE_CAP_MEM_STORAGE)
        let operations = info.capabilities & (TE_CAP_OP_READ | TE_CAP_OP_WRITE)
        guard memory != 0, operations != 0 else {
            return PluginCheckResult("name and protocols", .failed("capabilities 0x\(String(info.capabilities, radix: 16)) declare no memory kind or no operation"))
        }
        return PluginCheckResult("name and protocols", .passed,
                                 detail: "\(info.name) \(info.version), protocols \(info.protocols.joined(separator: ",")), capabilities 0x\(String(info.capabilities, radix: 16))\(note)")
    }

    // MARK: Probe

    static func probeAnswers(_ c: Context) -> PluginCheckResult {
        guard let v = c.vtable else { return PluginCheckResult("probe", .skipped("the plugin did not load")) }
        let answer = v.probe(c.options)
        c.probe = answer
        let word = PluginStatus.describe(answer.status)
        guard !answer.reason.isEmpty else { return PluginCheckResult("probe", .failed("probe answered \(word) without a reason")) }
        switch answer.status {
        case TE_OK:
            return PluginCheckResult("probe", .passed, detail: "ok: \(answer.reason)")
        case TE_ERR_HARDWARE_ABSENT, TE_ERR_LIBRARY_MISSING, TE_ERR_NOT_SUPPORTED, TE_ERR_INVALID_ARGUMENT:
            guard !answer.hint.isEmpty else { return PluginCheckResult("probe", .failed("probe answered \(word) (\(answer.reason)) with no hint of what to install or set")) }
            return PluginCheckResult("probe", .passed, detail: "\(word): \(answer.reason); hint: \(answer.hint)")
        default:
            return PluginCheckResult("probe", .failed("probe answered \(word) (\(answer.status)); expected ok, hardware absent or library missing"))
        }
    }

    static func probeOddOptions(_ c: Context) -> PluginCheckResult {
        guard let v = c.vtable else { return PluginCheckResult("probe with odd options", .skipped("the plugin did not load")) }
        var seen: [String] = []
        for options in HostileJSON.options {
            let answer = v.probe(options)
            seen.append(PluginStatus.describe(answer.status))
        }
        return PluginCheckResult("probe with odd options", .passed, detail: "\(HostileJSON.options.count) odd option texts (NULL, malformed, wrong types) answered: \(Set(seen).sorted().joined(separator: ", "))")
    }

    static func probeSmallBuffers(_ c: Context) -> PluginCheckResult {
        guard let v = c.vtable, let full = c.probe else { return PluginCheckResult("probe answers that do not fit", .skipped("the plugin did not load")) }
        var hintLength = 0
        let reason = v.text(capacity: 1) { r in
            let hint = v.text(capacity: 1) { h in c.options.withCString { v.d.probe!($0, r, h) } }
            hintLength = hint.length
            return hint.status
        }
        guard reason.length == full.reason.utf8.count, hintLength == full.hint.utf8.count else {
            return PluginCheckResult("probe answers that do not fit", .failed("with 1-byte buffers it reported lengths \(reason.length) and \(hintLength); the texts are \(full.reason.utf8.count) and \(full.hint.utf8.count) bytes"))
        }
        let expected = full.status == TE_OK ? TE_ERR_BUFFER_TOO_SMALL : full.status
        guard reason.status == expected || reason.status == TE_ERR_BUFFER_TOO_SMALL else {
            return PluginCheckResult("probe answers that do not fit", .failed("with 1-byte buffers it answered \(PluginStatus.describe(reason.status))"))
        }
        return PluginCheckResult("probe answers that do not fit", .passed, detail: "1-byte buffers: full lengths reported, \(PluginStatus.describe(reason.status))")
    }
}
