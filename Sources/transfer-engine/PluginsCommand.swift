import ArgumentParser
import Foundation
import TransferEngine

/// `plugins`: list transport plugins found and whether each can run here.
struct PluginsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugins",
        abstract: "List transport plugins on the search path and whether they can run on this machine, or check one plugin file.",
        discussion: """
        Search path: MC_TRANSPORT_PLUGIN_PATH, then directories next to this program, then \(PluginCatalog.systemDirectory).
        --check FILE.so runs the conformance checks a plugin author runs: loading and ABI rules, probe, create/destroy, descriptor \
        fragments, hostile input, argument checks, per-thread last_error, then transfers between two engines in two processes on \
        this host (sizes, refusals, four threads, a peer killed mid-batch). A plugin whose hardware is absent passes the checks \
        that need none and lists the rest as skipped. Settings the plugin reads (MC_*) come from the environment.
        """
    )

    @OptionGroup var logging: LoggingOptions

    @Option(help: "Devices passed to each plugin's probe (comma list or auto-discovery).")
    var deviceName: String = ""

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    @Option(name: .customLong("check"), help: ArgumentHelp("Run the conformance checks on a plugin file and exit non-zero if one fails.", valueName: "file.so"))
    var checkFile: String?

    @Option(name: .customLong("protocol"), help: "With --check: the protocol to check (default: the first the plugin declares).")
    var protocolName: String?

    @Option(name: .customLong("check-step"), help: .hidden)
    var checkStep: String?

    @Option(name: .customLong("check-from"), help: .hidden)
    var checkFrom = 0

    @Option(name: .customLong("check-report"), help: .hidden)
    var checkReport: String?

    func run() throws {
        _ = logging.logger()  // the library logs with these settings too
        if let checkFile {
            try PluginCheckCommand(file: checkFile, protocolName: protocolName, deviceName: deviceName, json: json, step: checkStep, from: checkFrom, report: checkReport).run()
            return
        }
        let environment = ProcessInfo.processInfo.environment
        let catalog = PluginCatalog(environment: environment)
        var configuration = EngineConfiguration()
        configuration.deviceName = deviceName
        var rows: [[String]] = [["tcp", "(built in)", "-", "-", "available", ""]]
        for file in catalog.pluginFiles() {
            switch PluginLoader.load(path: file.path) {
            case .success(let plugin):
                // A plugin serving several protocols is probed for the one its file is named after.
                let served = plugin.info.protocols.contains(file.protocolName) ? [file.protocolName] : plugin.info.protocols
                let options = TransferEngine.pluginOptions(configuration: configuration, segmentName: "", environment: environment,
                                                           protocolName: served[0])
                let probe = plugin.probe(optionsJSON: options)
                let status = probe.available ? "available" : probe.statusWord
                let detail = probe.available ? probe.reason : [probe.reason, probe.hint].filter { !$0.isEmpty }.joined(separator: "; ")
                rows.append([served.joined(separator: ","), file.path, plugin.info.abiVersion, plugin.info.version, status, detail])
            case .failure(let error):
                rows.append([file.protocolName, file.path, "-", "-", "failed", error.reason])
            }
        }
        if json {
            let objects = rows.map { row in
                ["protocol": row[0], "file": row[1], "abi": row[2], "version": row[3], "status": row[4], "detail": row[5]]
            }
            let data = try JSONSerialization.data(withJSONObject: ["search_path": catalog.directories, "plugins": objects], options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("search path: \(catalog.directories.joined(separator: ":"))")
        print(Table.render(header: ["protocol", "file", "abi", "version", "status", "detail"], rows: rows))
    }
}

/// Left-aligned text tables.
enum Table {
    static func render(header: [String], rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        func line(_ row: [String]) -> String {
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }
        let rule = widths.enumerated().map { index, width in String(repeating: "-", count: index == widths.count - 1 ? max(width, 6) : width) }.joined(separator: "  ")
        return ([line(header), rule] + rows.map(line)).joined(separator: "\n")
    }
}
