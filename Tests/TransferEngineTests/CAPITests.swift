import Foundation
import Testing
@testable import TransferEngine
@testable import TransferEngineMetadataServer

/// The C API, used from a C program compiled against transfer_engine_c.h and
/// linked to the built libtransfer_engine_c.so (what C callers and the Python
/// package load).
@Suite("C API (libtransfer_engine_c.so)")
struct CAPITests {
    /// Compiles a fixture C program against the header and the built library; `upstreamName`:
    /// linked as upstream's library is (-ltransfer_engine), as NIXL's Mooncake backend does.
    private static func compile(_ name: String, upstreamName: Bool = false) throws -> String {
        let directory = try TestSupport.temporaryDirectory()
        let library = TestSupport.productsDirectory.appendingPathComponent("libtransfer_engine_c.so").path
        try #require(FileManager.default.fileExists(atPath: library), "libtransfer_engine_c.so was not built")
        let program = directory.appendingPathComponent(name).path
        let source = TestSupport.repoRoot.appendingPathComponent("Tests/TransferEngineTests/Fixtures/\(name).c").path
        let include = TestSupport.repoRoot.appendingPathComponent("Sources/CTransferEngineC/include").path
        var linkage = [library]
        if upstreamName {
            try FileManager.default.createSymbolicLink(atPath: directory.appendingPathComponent("libtransfer_engine.so").path, withDestinationPath: library)
            // The build's library has no SONAME (the .deb's has): the program needs the link's name, found here.
            linkage = ["-L", directory.path, "-ltransfer_engine", "-Wl,-rpath," + directory.path]
        }
        let (ccStatus, _, ccError) = try TestSupport.run("/usr/bin/cc", ["-O1", "-Wall", "-Werror", "-I", include, source] + linkage
                                                                         + ["-Wl,-rpath," + TestSupport.productsDirectory.path, "-o", program])
        try #require(ccStatus == 0, "cc failed: \(ccError)")
        return program
    }

    private static var environment: [String: String] {
        var environment = TestSupport.cleanEnvironment()
        environment["SWIFT_BACKTRACE"] = "enable=no"
        return environment
    }

    @Test("a C program drives two engines through the header: registration, batches, status, notifications, bad arguments")
    func smoke() throws {
        let program = try Self.compile("capi_smoke")
        let (status, out, err) = try TestSupport.run(program, [], environment: Self.environment, timeout: 120)
        #expect(status == 0, "\(out)\n\(err.suffix(3000))")
        #expect(out.contains("capi: ") && out.contains(", 0 failed"), "\(out)")
    }

    @Test("upstream's newer entry points from C: rpc_port (a taken one refused), ip_or_host_name, auto_discover, removeLocalSegment, warmupEfaSegment, discoverTopology, showLinks, getNicLoadStats")
    func extras() throws {
        let program = try Self.compile("capi_extras")
        let (status, out, err) = try TestSupport.run(program, ["\(try TestSupport.freePort())"], environment: Self.environment, timeout: 120)
        #expect(status == 0, "\(out)\n\(err.suffix(3000))")
        #expect(out.contains("capi extras: ") && out.contains(", 0 failed"), "\(out)")
    }

    @Test("NIXL's Mooncake backend call sequence, built as it builds (-ltransfer_engine): two agents, a notified 1024-entry batch polled as checkXfer does, notifications, teardown")
    func nixlSequence() throws {
        let program = try Self.compile("capi_nixl", upstreamName: true)
        let (status, out, err) = try TestSupport.run(program, [], environment: Self.environment, timeout: 120)
        #expect(status == 0, "\(out)\n\(err.suffix(3000))")
        #expect(out.contains("nixl sequence: ") && out.contains(", 0 failed"), "\(out)")
    }

    @Test("enableGracefulShutdown: SIGTERM removes the engine's keys from the metadata server, then the process ends with 143")
    func gracefulShutdown() throws {
        let program = try Self.compile("capi_extras")
        let server = try MetadataHTTPServer(host: "127.0.0.1", port: 0)
        defer { server.stop() }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: program)
        process.arguments = ["graceful", "http://127.0.0.1:\(server.port)/metadata"]
        process.environment = Self.environment
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        let ready = output.fileHandleForReading.availableData
        try #require(String(decoding: ready, as: UTF8.self).contains("READY"), "no READY line")
        #expect(server.keyCount == 2, "the segment and rpc_meta keys are published")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit && process.terminationStatus == 143, "\(process.terminationReason) \(process.terminationStatus)")
        #expect(server.keyCount == 0, "the keys are removed before the process ends")
    }
}
