import Foundation
import Testing
@testable import TransferEngine
@testable import TransferEngineMetadataServer

/// Upstream's environment names: each takes effect or is reported once as ignored, with why; a
/// loopback address published to a metadata server is warned about.
@Suite("Upstream environment names", .serialized)
struct UpstreamEnvironmentTests {
    private func engine(_ extra: [String: String], configuration: EngineConfiguration = EngineConfiguration())
        throws -> (TransferEngine, LogCapture) {
        let (logger, capture) = TestSupport.capturingLogger()
        var settings = ["MC_TRANSPORT_PLUGIN_PATH": TestSupport.productsDirectory.path]
        for (key, value) in extra { settings[key] = value }
        let engine = try TransferEngine(configuration: configuration, environment: TestSupport.cleanEnvironment(settings), logger: logger)
        return (engine, capture)
    }

    @Test("MC_FORCE_TCP runs tcp only, saying so; ignored names give one warning each with the reason; MC_TE_METRIC=0 none")
    func forceTCPAndIgnoredNames() throws {
        let (forced, forcedLog) = try engine(["MC_FORCE_TCP": "1"], configuration: EngineConfiguration(protocolName: "shm"))
        defer { forced.shutdown() }
        #expect(forced.activeProtocols == ["tcp"])
        #expect(forcedLog.messages(at: .info).contains { $0.contains("MC_FORCE_TCP is set: only tcp runs (protocol 'shm'") })
        let names = ["MC_FORCE_HCA", "MC_CUSTOM_TOPO_JSON", "MC_IB_PORT", "MC_HANDSHAKE_PORT", "MC_USE_IPV6"]
        let (ignoring, log) = try engine(Dictionary(uniqueKeysWithValues: names.map { ($0, "1") }))
        defer { ignoring.shutdown() }
        let warnings = log.messages(at: .warning)
        for name in names {
            #expect(warnings.filter { $0.hasPrefix("\(name) is ignored: ") }.count == 1, "\(name): \(warnings)")
        }
        let (quiet, quietLog) = try engine(["MC_TE_METRIC": "0"])
        defer { quiet.shutdown() }
        #expect(quietLog.messages(at: .warning).isEmpty)
    }

    @Test("MC_DISABLE_METACACHE: openSegment fetches the descriptor again (memory registered since shows), the cached one otherwise")
    func disableMetacache() throws {
        let target = try TransferEngine(configuration: EngineConfiguration(), environment: TestSupport.cleanEnvironment())
        defer { target.shutdown() }
        let first = TestBuffer(4096), second = TestBuffer(4096)
        try target.registerMemory(address: first.address, length: 4096)
        for (flag, expected) in [("1", 2), ("0", 1)] {
            let (engine, _) = try engine(["MC_DISABLE_METACACHE": flag])
            defer { engine.shutdown() }
            let handle = try engine.openSegment(target.segmentName)
            #expect(try engine.descriptor(of: handle).buffers.count == 1)
            try target.registerMemory(address: second.address, length: 4096)
            #expect(try engine.descriptor(of: engine.openSegment(target.segmentName)).buffers.count == expected, "MC_DISABLE_METACACHE=\(flag)")
            try target.unregisterMemory(address: second.address)
        }
    }

    @Test("a loopback address published to a metadata server is warned about, naming the settings to change; P2P is not")
    func loopbackPublished() throws {
        let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
        defer { server.stop() }
        let (shared, log) = try engine([:], configuration: EngineConfiguration(localHostname: "127.0.0.1",
                                                                               metadataServer: "http://127.0.0.1:\(server.port)/metadata"))
        defer { shared.shutdown() }
        let warnings = log.messages(at: .warning).filter { $0.contains("loopback") }
        #expect(warnings.count == 1 && warnings[0].contains("MOONCAKE_LOCAL_HOSTNAME"), "\(warnings)")
        let (p2p, p2pLog) = try engine([:])
        defer { p2p.shutdown() }
        #expect(!p2pLog.messages(at: .warning).contains { $0.contains("loopback") })
    }

    @Test("an empty local_hostname with a metadata server becomes the address that routes to it, said once; with P2PHANDSHAKE it is an error")
    func emptyLocalHostname() throws {
        let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
        defer { server.stop() }
        let (engine, log) = try engine([:], configuration: EngineConfiguration(localHostname: "", metadataServer: "http://127.0.0.1:\(server.port)/metadata"))
        defer { engine.shutdown() }
        #expect(engine.segmentName == "127.0.0.1")
        #expect(log.messages(at: .info).contains { $0.contains("local_hostname is empty: using 127.0.0.1") && $0.contains("routes to the metadata server") })
        #expect(throws: EngineError.self) { _ = try self.engine([:], configuration: EngineConfiguration(localHostname: "")) }
        var file = EngineConfiguration.Overrides()
        file.metadataServer = "P2PHANDSHAKE"
        let directory = try TestSupport.temporaryDirectory()
        let config = directory.appendingPathComponent("empty.json")
        try #"{"local_hostname": "", "metadata_server": "P2PHANDSHAKE"}"#.write(to: config, atomically: true, encoding: .utf8)
        file.configPath = config.path
        #expect(throws: EngineError.self) { _ = try EngineConfiguration.resolve(file, environment: [:]) }
        try #"{"local_hostname": "", "metadata_server": "http://127.0.0.1:1/metadata"}"#.write(to: config, atomically: true, encoding: .utf8)
        #expect(try EngineConfiguration.resolve(EngineConfiguration.Overrides(configPath: config.path), environment: [:]).configuration.localHostname == "")
    }
}

