import Foundation
import Testing
@testable import TransferEngine

/// `transfer-engine plugins --check`: the example C plugin passes every check; each deliberate
/// fault fails the check it breaks (and only that one); this tree's plugins pass where their
/// medium exists here and skip the rest with the probe's reason.
@Suite("Plugin checker", .serialized)
struct PluginCheckTests {
    /// Runs the checker on `file`; its exit status and the results by check name.
    private func check(_ file: String, protocolName: String? = nil, _ settings: [String: String] = [:]) throws -> (Int32, [String: (result: String, detail: String)]) {
        var environment = TestSupport.cleanEnvironment(settings)
        environment.removeValue(forKey: "FI_PROVIDER")
        let (status, output, stderr) = try TestSupport.run(TestSupport.cli, ["plugins", "--check", file, "--json"] + (protocolName.map { ["--protocol", $0] } ?? []),
                                                           environment: environment, timeout: 300)
        guard let data = output.data(using: .utf8), let document = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let checks = document["checks"] as? [[String: String]] else {
            throw TestFailure("plugins --check printed no JSON report (status \(status)): \(output.suffix(400)) \(stderr.suffix(400))")
        }
        var results: [String: (String, String)] = [:]
        for check in checks { results[check["check"] ?? ""] = (check["result"] ?? "", check["detail"] ?? "") }
        #expect(results.count == PluginVtableCheck.names.count + 6, "every check is reported: \(results.keys.sorted())")
        return (status, results)
    }

    /// Compiles the example plugin (or a broken copy with `fault`) into a fresh directory.
    private func buildExample(fault: String? = nil) throws -> String {
        let directory = try TestSupport.temporaryDirectory("te-check")
        let output = directory.appendingPathComponent("libtransport_loopback.so").path
        let source = fault == nil ? "Plugins/Example/loopback_plugin.c" : "Tests/TransferEngineTests/Fixtures/broken_loopback.c"
        let arguments = ["-shared", "-fPIC", "-O1", "-Wall", "-I", FixturePlugins.include,
                         "-I", TestSupport.repoRoot.appendingPathComponent("Plugins/Example").path]
            + (fault.map { ["-DFAULT_\($0)"] } ?? []) + [TestSupport.repoRoot.appendingPathComponent(source).path, "-o", output, "-lpthread"]
        let (status, _, stderr) = try TestSupport.run("/usr/bin/cc", arguments)
        guard status == 0 else { throw TestFailure("cc failed: \(stderr)") }
        return output
    }

    @Test("the example C plugin passes every check, none skipped")
    func examplePasses() throws {
        let (status, results) = try check(try buildExample())
        let notPassed = results.filter { $0.value.result != "pass" }
        #expect(notPassed.isEmpty, "\(notPassed)")
        #expect(status == 0)
    }

    @Test("each deliberate fault fails the check it breaks, and the run goes on after a crash",
          arguments: [("SHARED_ERROR", "last_error per thread"), ("CRASH", "hostile peer descriptors"), ("TWICE", "each completion reported once"),
                      ("NO_REVOKE", "refused after the peer unregistered"), ("SIZE", "abi version"), ("HANG", "hostile handshakes")])
    func faultsFail(_ fault: String, _ broken: String) throws {
        let (status, results) = try check(try buildExample(fault: fault), protocolName: "loopback", ["TE_CHECK_TIMEOUT_S": "3"])
        #expect(status != 0, "a failed check makes the exit status non-zero")
        #expect(results[broken]?.result == "fail", "\(fault): \(broken) \(results[broken].map { "\($0)" } ?? "missing")")
        let otherFailures = results.filter { $0.value.result == "fail" && $0.key != broken }
        #expect(otherFailures.isEmpty, "\(fault): only \(broken) fails: \(otherFailures)")
        if fault == "HANG" {
            #expect(results[broken]?.detail.contains("within 3 s") == true, "\(results[broken].map { "\($0)" } ?? "")")
            #expect(results["submit and poll arguments"]?.result == "pass", "the checks after the hang ran")
        }
        if fault == "CRASH" {
            // The checks after the crash ran in a fresh child process.
            #expect(results["hostile handshakes"]?.result == "pass")
            // Killed by SIGSEGV, or (under a sanitizer, which catches it) exited with its status.
            #expect(results["hostile peer descriptors"]?.detail.contains("during this check") == true)
        }
    }

    @Test("this tree's plugins pass where their medium exists here, their device figures agreeing with the bytes moved")
    func treePluginsPass() throws {
        let products = TestSupport.productsDirectory
        let directory = try TestSupport.temporaryDirectory("te-check-media")
        let pool = try ConformanceCase.file(in: directory, "pool.img", size: 256 << 20)
        let namespace = try ConformanceCase.file(in: directory, "ns.img", size: 128 << 20)
        let cases: [(String, [String: String])] = [
            ("shm", [:]), ("efa", ["MC_EFA_PROVIDER": "tcp;ofi_rxm"]), ("cxl", ["MC_CXL_DEV_PATH": pool]), ("nvmeof", ["MC_NVMEOF_NAMESPACES": namespace]),
        ]
        for (name, settings) in cases {
            let file = products.appendingPathComponent("libtransport_\(name).so").path
            guard FileManager.default.fileExists(atPath: file) else {
                print("plugin check: \(name) skipped: libtransport_\(name).so was not built here")
                continue
            }
            let (status, results) = try check(file, settings)
            // nvmeof's checks run against the peer's namespace (registered memory goes over tcp):
            // there is no registered buffer to unregister under it.
            let expectedSkips: Set<String> = name == "nvmeof" ? ["refused after the peer unregistered"] : []
            let notPassed = results.filter { $0.value.result != "pass" && !expectedSkips.contains($0.key) }
            #expect(notPassed.isEmpty, "\(name): \(notPassed)")
            for skip in expectedSkips { #expect(results[skip]?.result == "skip", "\(name): \(skip)") }
            #expect(results["sizes 1 B to 16 MiB"]?.detail.contains("through the plugin") == true, "\(name)")
            // Each reports its devices (ABI 1.2 stats), and their figures match the bytes moved.
            #expect(results["sizes 1 B to 16 MiB"]?.detail.contains("device stats agree") == true, "\(name): \(results["sizes 1 B to 16 MiB"]?.detail ?? "")")
            #expect(status == 0, "\(name)")
        }
    }

    @Test("a plugin whose runtime is missing passes what needs none and skips the rest with the probe's reason")
    func missingRuntimeSkips() throws {
        let file = TestSupport.productsDirectory.appendingPathComponent("libtransport_nvlink_intra.so").path
        let (status, results) = try check(file, ["MC_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"])
        #expect(status == 0)
        #expect(results["probe"]?.result == "pass")
        #expect(results["probe"]?.detail.hasPrefix("library missing") == true, "\(results["probe"].map { "\($0)" } ?? "")")
        #expect(results["name and protocols"]?.detail.contains("nvlink_intra") == true)
        for name in ["create and destroy, three times", "hostile peer descriptors", "sizes 1 B to 16 MiB", "peer killed mid-batch"] {
            #expect(results[name]?.result == "skip", "\(name)")
        }
        #expect(!results.values.contains { $0.result == "fail" })
    }
}
