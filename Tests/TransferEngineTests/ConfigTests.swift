import Foundation
import Testing
@testable import TransferEngine

@Suite("Configuration")
struct ConfigTests {
    private func write(_ text: String) throws -> String {
        let url = try TestSupport.temporaryDirectory().appendingPathComponent("mooncake.json")
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    @Test("defaults are TCP over P2PHANDSHAKE on loopback")
    func defaults() throws {
        let (configuration, warnings) = try EngineConfiguration.resolve(environment: [:])
        #expect(configuration == EngineConfiguration())
        #expect(configuration.protocolName == "tcp" && configuration.metadataServer == "P2PHANDSHAKE")
        #expect(warnings.isEmpty)
    }

    @Test("precedence: argument > environment > config file > default")
    func precedence() throws {
        let path = try write("""
        {"local_hostname": "10.1.1.1", "protocol": "rdma", "device_name": "mlx5_0", "metadata_server": "P2PHANDSHAKE",
         "master_server_address": "m:50051", "global_segment_size": "3GB", "local_buffer_size": 536870912}
        """)
        let fileOnly = try EngineConfiguration.resolve(.init(configPath: path), environment: [:]).configuration
        #expect(fileOnly.localHostname == "10.1.1.1" && fileOnly.protocolName == "rdma" && fileOnly.deviceName == "mlx5_0")
        #expect(fileOnly.globalSegmentSize == 3 << 30 && fileOnly.localBufferSize == 512 << 20)
        #expect(fileOnly.masterServerAddress == "m:50051")

        let environment = ["MOONCAKE_CONFIG_PATH": path, "MOONCAKE_PROTOCOL": "EFA", "MOONCAKE_DEVICE": "rdmap0"]
        let withEnv = try EngineConfiguration.resolve(environment: environment).configuration
        #expect(withEnv.protocolName == "efa" && withEnv.deviceName == "rdmap0" && withEnv.localHostname == "10.1.1.1")

        let withArgs = try EngineConfiguration.resolve(.init(protocolName: "tcp", deviceName: ""), environment: environment).configuration
        #expect(withArgs.protocolName == "tcp" && withArgs.deviceName == "")
    }

    @Test("malformed JSON is an error that names the file and the position")
    func malformed() throws {
        let path = try write("{\n  \"protocol\": \"tcp\",\n  \"device_name\": ,\n}")
        do {
            _ = try EngineConfiguration.resolve(.init(configPath: path), environment: [:])
            Issue.record("expected an error")
        } catch let error as EngineError {
            #expect(error.description.contains(path))
            #expect(error.description.contains("line 3"), "message was: \(error)")
        }
    }

    @Test("bad sizes, wrong types and missing files are errors; unknown keys warn")
    func badValues() throws {
        #expect(throws: EngineError.self) { try EngineConfiguration.resolve(.init(configPath: try write(#"{"global_segment_size": "12 parsecs"}"#)), environment: [:]) }
        #expect(throws: EngineError.self) { try EngineConfiguration.resolve(.init(configPath: try write(#"{"protocol": 5}"#)), environment: [:]) }
        #expect(throws: EngineError.self) { try EngineConfiguration.resolve(.init(configPath: try write("[1,2]")), environment: [:]) }
        #expect(throws: EngineError.self) { try EngineConfiguration.resolve(.init(configPath: "/nonexistent/te.json"), environment: [:]) }
        #expect(throws: EngineError.self) { try EngineConfiguration.resolve(environment: ["MOONCAKE_LOCAL_BUFFER_SIZE": "lots"]) }
        let (_, warnings) = try EngineConfiguration.resolve(.init(configPath: try write(#"{"protocl": "tcp", "tenant_id": "x"}"#)), environment: [:])
        #expect(warnings.count == 1 && warnings[0].contains("'protocl'"))
    }

    @Test("sizes: plain integers and B/KB/MB/GB/TB and KiB..TiB units (binary, as upstream)")
    func sizes() throws {
        #expect(try ByteSize.parse("1073741824") == 1 << 30)
        #expect(try ByteSize.parse("3GB") == 3 << 30)
        #expect(try ByteSize.parse("512 MiB") == 512 << 20)
        #expect(try ByteSize.parse("4k") == 4096)
        #expect(try ByteSize.parse("1.5 KiB") == 1536)
        #expect(try ByteSize.parse("7b") == 7)
        #expect(throws: EngineError.self) { try ByteSize.parse("") }
        #expect(throws: EngineError.self) { try ByteSize.parse("-3GB") }
        #expect(throws: EngineError.self) { try ByteSize.parse("99999999999TB") }
        #expect(ByteSize.format(64 << 20) == "64 MiB")
    }

    @Test("metadata server forms; anything else names the accepted forms")
    func metadataForms() throws {
        #expect(try MetadataServer.parse("P2PHANDSHAKE") == .p2pHandshake)
        #expect(try MetadataServer.parse("etcd://10.0.0.1:2379,10.0.0.2:2379") == .etcd(["10.0.0.1:2379", "10.0.0.2:2379"]))
        #expect(try MetadataServer.parse("127.0.0.1:2379") == .etcd(["127.0.0.1:2379"]))
        #expect(try MetadataServer.parse("redis://127.0.0.1:6379") == .redis("127.0.0.1:6379"))
        #expect(try MetadataServer.parse("http://127.0.0.1:8080/metadata") == .http("http://127.0.0.1:8080/metadata"))
        do {
            _ = try MetadataServer.parse("zookeeper://x")
            Issue.record("expected an error")
        } catch let error as EngineError {
            #expect(error.description.contains("P2PHANDSHAKE") && error.description.contains("redis://"))
        }
    }

    @Test("an engine refuses a metadata backend this build lacks, before binding anything")
    func unsupportedBackend() throws {
        let configuration = EngineConfiguration(metadataServer: "etcd://127.0.0.1:2379")
        #expect(throws: EngineError.self) {
            _ = try TransferEngine(configuration: configuration, environment: TestSupport.cleanEnvironment())
        }
    }
}
