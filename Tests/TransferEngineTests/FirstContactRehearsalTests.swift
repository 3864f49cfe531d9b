import Foundation
import Testing
@testable import TransferEngine

/// At start-up an engine rehearses a first contact (a descriptor fetch, a 4 KiB write and read)
/// against private servers on 127.0.0.1, so the Swift runtime's first-use work is done before a
/// peer's first request. The rehearsal must complete, leave nothing listening, and touch none of
/// the engine's own state.
@Suite("First-contact rehearsal at engine start")
struct FirstContactRehearsalTests {
    @Test("the rehearsal completes, with and without authentication, and can be turned off; its servers are closed; the engine's own state is untouched and it serves peers")
    func rehearsal() throws {
        let cases: [(secret: String?, rehearse: Bool)] = [(nil, true), ("correct horse battery staple", true), (nil, false)]
        for (secret, rehearse) in cases {
            var settings = secret.map { ["MC_AUTH_SECRET": $0] } ?? [:]
            if !rehearse { settings["MC_REHEARSE_FIRST_CONTACT"] = "0" }
            let environment = TestSupport.cleanEnvironment(settings)
            let label = "authentication \(secret == nil ? "off" : "on"), rehearsal \(rehearse ? "on" : "off")"
            let target = try TransferEngine(configuration: EngineConfiguration(), environment: environment)
            let initiator = try TransferEngine(configuration: EngineConfiguration(), environment: environment)
            defer { initiator.shutdown(); target.shutdown() }
            for engine in [target, initiator] {
                #expect(engine.rehearsal.completed == rehearse, "\(label)")
                #expect(engine.rehearsal.ports.count == (rehearse ? 2 : 0), "\(label)")
                #expect(!engine.rehearsal.ports.contains(engine.rpcPort) && !engine.rehearsal.ports.contains(engine.dataPort))
                // Both private listeners refuse connections once the engine is up.
                for port in engine.rehearsal.ports {
                    #expect(throws: (any Error).self, "port \(port) of the rehearsal still accepts (\(label))") {
                        try Socket.connect(host: "127.0.0.1", port: port, timeoutMs: 1000).close()
                    }
                }
                #expect(engine.localDescriptor.buffers.isEmpty)
                #expect(engine.takeNotifications().isEmpty)
            }
            // The engine's own ports serve a first contact afterwards.
            let remote = TestBuffer(8192), local = TestBuffer(8192)
            local.fillPattern(seed: 9)
            try target.registerMemory(address: remote.address, length: 8192)
            try initiator.registerMemory(address: local.address, length: 8192)
            let handle = try initiator.openSegment(target.segmentName)
            try initiator.transferSync(.write, localAddress: local.address, segment: handle, remoteAddress: remote.address, length: 8192)
            #expect(remote.equals(local, length: 8192), "\(label)")
        }
    }
}
