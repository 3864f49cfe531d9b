import Foundation
import Testing
@testable import TransferEngine

/// The C API, used from a C program compiled against transfer_engine_c.h and
/// linked to the built libtransfer_engine_c.so (what C callers and the Python
/// package load).
@Suite("C API (libtransfer_engine_c.so)")
struct CAPITests {
    @Test("a C program drives two engines through the header: registration, batches, status, notifications, bad arguments")
    func smoke() throws {
        let directory = try TestSupport.temporaryDirectory()
        let library = TestSupport.productsDirectory.appendingPathComponent("libtransfer_engine_c.so").path
        try #require(FileManager.default.fileExists(atPath: library), "libtransfer_engine_c.so was not built")
        let program = directory.appendingPathComponent("capi_smoke").path
        let source = TestSupport.repoRoot.appendingPathComponent("Tests/TransferEngineTests/Fixtures/capi_smoke.c").path
        let include = TestSupport.repoRoot.appendingPathComponent("Sources/CTransferEngineC/include").path
        let (ccStatus, _, ccError) = try TestSupport.run("/usr/bin/cc", ["-O1", "-Wall", "-Werror", "-I", include, source, library,
                                                                         "-Wl,-rpath," + TestSupport.productsDirectory.path, "-o", program])
        try #require(ccStatus == 0, "cc failed: \(ccError)")
        var environment = TestSupport.cleanEnvironment()
        environment["SWIFT_BACKTRACE"] = "enable=no"
        let (status, out, err) = try TestSupport.run(program, [], environment: environment, timeout: 120)
        #expect(status == 0, "\(out)\n\(err.suffix(3000))")
        #expect(out.contains("capi: ") && out.contains(", 0 failed"), "\(out)")
    }
}
