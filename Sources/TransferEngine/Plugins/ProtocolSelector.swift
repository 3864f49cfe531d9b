/// Picks the transport for the requested protocol: TCP (built in) or a
/// plugin that loads and probes as available. When the plugin is missing or
/// reports hardware absent the choice falls back to TCP with a reason, unless
/// strict mode (`MC_STRICT_PROTOCOL=1`) turns that into an error.
public enum ProtocolSelector {
    /// Protocol names the engine knows, whether or not their plugin is installed.
    public static let knownProtocols = ["tcp", "rdma", "efa", "nvmeof", "nvlink", "nvlink_intra", "hip", "barex", "cxl", "ascend"]

    /// The outcome of a selection.
    public struct Selection: Sendable {
        /// The protocol that was asked for (after `MC_FORCE_MNNVL` mapping).
        public var requested: String
        /// The protocol that will run.
        public var effective: String
        /// The plugin that serves `effective`, nil for TCP.
        public var plugin: LoadedPlugin?
        /// Why the requested protocol is not running, when it fell back.
        public var fallbackReason: String?
        /// What the user can do about it.
        public var fallbackHint: String?
        /// An informational line when another plugin stands in for the requested one (rdma -> nvlink).
        public var notice: String?
        /// What runs instead after a fallback ("tcp", or the other transports of a list).
        public var fallbackTarget = "tcp"

        /// The single warning line for a fallback.
        public var warningLine: String? {
            guard let fallbackReason else { return nil }
            var line = "protocol '\(requested)' is unavailable (\(fallbackReason)); falling back to \(fallbackTarget)."
            if let fallbackHint, !fallbackHint.isEmpty { line += " Fix: \(fallbackHint)." }
            line += " Set MC_STRICT_PROTOCOL=1 to make this an error."
            return line
        }
    }

    /// The Debian package that ships a protocol's plugin (package names have no underscores).
    public static func packageName(_ protocolName: String) -> String {
        "transfer-engine-plugin-" + String(protocolName.map { $0 == "_" ? "-" : $0 })
    }

    static func truthy(_ value: String?) -> Bool {
        guard let value else { return false }
        return ["1", "true", "yes", "on"].contains(value.lowercased())
    }

    /// Resolves `requested` against the catalog.
    ///
    /// `rdma` follows upstream's rule: `MC_FORCE_MNNVL=true` asks for `nvlink` instead; without
    /// a usable RDMA NIC, `nvlink` (MNNVL) is used when it is available, else TCP.
    /// `probeOptions` gives the options JSON a plugin is probed with, for the protocol it is probed for.
    public static func select(requested rawName: String, catalog: PluginCatalog, environment: [String: String],
                              probeOptions: (String) -> String) throws -> Selection {
        var name = rawName.trimmingCharacters(in: .whitespaces).lowercased()
        if name == "rdma", truthy(environment["MC_FORCE_MNNVL"]) { name = "nvlink" }
        let strict = truthy(environment["MC_STRICT_PROTOCOL"])
        guard name == "rdma" else {
            return try selectOne(name, rawName: rawName, catalog: catalog, strict: strict, probeOptions: probeOptions)
        }
        let rdma = try selectOne(name, rawName: rawName, catalog: catalog, strict: false, probeOptions: probeOptions)
        guard let reason = rdma.fallbackReason else { return rdma }
        let mnnvl = try selectOne("nvlink", rawName: "nvlink", catalog: catalog, strict: false, probeOptions: probeOptions)
        if mnnvl.plugin != nil {
            var chosen = mnnvl
            chosen.requested = name
            chosen.notice = "rdma is unavailable (\(reason)); using nvlink (MNNVL), as upstream does without RDMA NICs"
            return chosen
        }
        if strict {
            throw EngineError.protocolUnavailable(protocolName: name, reason: reason + ((rdma.fallbackHint ?? "").isEmpty ? "" : "; \(rdma.fallbackHint!)"))
        }
        return rdma
    }

    /// A protocol list as given ("rdma,nvmeof"): names in order, lower-cased. Empty elements and
    /// repeats are dropped, and tcp goes last wherever it was written (it is always the last
    /// resort); `notes` says what was changed, for one info line.
    public static func parseList(_ raw: String) -> (names: [String], notes: [String]) {
        var names: [String] = []
        var notes: [String] = []
        let parts = raw.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        if parts.count > 1, parts.contains(where: \.isEmpty) { notes.append("empty entries in '\(raw)' are ignored") }
        for name in parts where !name.isEmpty {
            if names.contains(name) { notes.append("'\(name)' is listed twice; the first place counts"); continue }
            names.append(name)
        }
        if let index = names.firstIndex(of: "tcp"), index != names.count - 1 {
            names.remove(at: index)
            names.append("tcp")
            notes.append("tcp is always tried last, wherever it is listed")
        }
        if names.isEmpty { names = ["tcp"] }
        return (names, notes)
    }

    /// Resolves a protocol list: one selection per name (tcp excluded: it is always installed),
    /// each loaded and probed as `select` does. An unknown name is an error; a name whose plugin
    /// or hardware is missing falls back (its warning names what still runs), unless strict.
    public static func selectList(requested rawList: String, catalog: PluginCatalog, environment: [String: String],
                                  probeOptions: (String) -> String) throws -> (selections: [Selection], notes: [String]) {
        let (names, notes) = parseList(rawList)
        var selections: [Selection] = []
        for name in names where name != "tcp" {
            let selection = try select(requested: name, catalog: catalog, environment: environment, probeOptions: probeOptions)
            if selection.plugin != nil, selections.contains(where: { $0.plugin != nil && $0.effective == selection.effective }) { continue }
            selections.append(selection)
        }
        let running = selections.filter { $0.plugin != nil }.map(\.effective) + ["tcp"]
        for index in selections.indices where selections[index].plugin == nil {
            selections[index].fallbackTarget = running.count == 1 ? "tcp" : "the other transports (\(running.joined(separator: ", ")))"
        }
        return (selections, notes)
    }

    /// The same, with one options JSON for every probe.
    public static func select(requested rawName: String, catalog: PluginCatalog, environment: [String: String],
                              probeOptionsJSON: String) throws -> Selection {
        try select(requested: rawName, catalog: catalog, environment: environment, probeOptions: { _ in probeOptionsJSON })
    }

    private static func selectOne(_ name: String, rawName: String, catalog: PluginCatalog, strict: Bool,
                                  probeOptions: (String) -> String) throws -> Selection {
        if name == "tcp" { return Selection(requested: name, effective: "tcp") }

        var path = catalog.file(for: name)
        var preloaded: LoadedPlugin?
        if path == nil {
            // A plugin may serve a protocol its file name does not spell.
            var declared: [String] = []
            for file in catalog.pluginFiles() {
                guard case .success(let plugin) = PluginLoader.load(path: file.path) else { continue }
                declared += plugin.info.protocols
                if plugin.info.protocols.contains(name) { path = file.path; preloaded = plugin; break }
            }
            if path == nil, !knownProtocols.contains(name) {
                var valid = knownProtocols
                for extra in declared where !valid.contains(extra) { valid.append(extra) }
                throw EngineError.unknownProtocol(rawName, valid: valid)
            }
        }

        func fallback(_ reason: String, _ hint: String) throws -> Selection {
            if strict {
                throw EngineError.protocolUnavailable(protocolName: name, reason: reason + (hint.isEmpty ? "" : "; \(hint)"))
            }
            return Selection(requested: name, effective: "tcp", plugin: nil, fallbackReason: reason, fallbackHint: hint)
        }

        guard let path else {
            return try fallback("no plugin file \(PluginCatalog.filePrefix)\(name).so in \(catalog.directories.joined(separator: ":"))",
                                "install the \(packageName(name)) package or point MC_TRANSPORT_PLUGIN_PATH at the plugin")
        }
        let plugin: LoadedPlugin
        if let preloaded { plugin = preloaded } else {
            switch PluginLoader.load(path: path) {
            case .success(let loaded): plugin = loaded
            case .failure(let error): return try fallback("plugin \(path) \(error.reason)", "reinstall the \(packageName(name)) package")
            }
        }
        guard plugin.info.protocols.contains(name) else {
            return try fallback("plugin \(path) serves \(plugin.info.protocols.joined(separator: ",")), not \(name)", "")
        }
        let probe = plugin.probe(optionsJSON: probeOptions(name))
        guard probe.available else {
            return try fallback("\(plugin.info.name) plugin: \(probe.statusWord): \(probe.reason)", probe.hint)
        }
        return Selection(requested: name, effective: name, plugin: plugin)
    }
}
