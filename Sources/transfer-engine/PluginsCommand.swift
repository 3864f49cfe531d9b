import ArgumentParser
import Foundation
import TransferEngine

/// `plugins`: list transport plugins found and whether each can run here.
struct PluginsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugins",
        abstract: "List transport plugins on the search path and whether they can run on this machine.",
        discussion: "Search path: MC_TRANSPORT_PLUGIN_PATH, then directories next to this program, then \(PluginCatalog.systemDirectory)."
    )

    @Option(help: "Devices passed to each plugin's probe (comma list or auto-discovery).")
    var deviceName: String = ""

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func run() throws {
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
