import Testing
@testable import GPUPlugin

/// The GPU plugins' device-free logic: options, upstream's handle text, peer descriptors and reachability.
@Suite("GPU plugin descriptors and options (no GPU needed)")
struct GPUDescriptorTests {
    @Test("options: protocol picks the mode, device_name cuda:N, hip:N or N, MC_* settings checked")
    func options() throws {
        let intra = try GPUOptions(json: #"{"protocol":"nvlink_intra","device_name":"cuda:3","options":{"MC_GPU_WORKERS":"4"}}"#)
        #expect(intra.mode == .intra && intra.device == 3 && intra.workers == 4)
        let fabric = try GPUOptions(json: #"{"protocol":"nvlink","device_name":"1","options":{"MC_CUDA_LIBRARY":"/opt/libcuda.so.1"}}"#)
        #expect(fabric.mode == .mnnvl && fabric.device == 1 && fabric.library == "/opt/libcuda.so.1")
        #expect(try GPUOptions(json: #"{"protocol":"nvlink","device_name":"auto-discovery"}"#).device == 0)
        let hip = try GPUOptions(json: #"{"protocol":"hip","device_name":"hip:2","options":{"MC_HIP_LIBRARY":"libamdhip64.so.6","MC_CUDA_LIBRARY":"x"}}"#)
        #expect(hip.mode == .hip && hip.device == 2 && hip.library == "libamdhip64.so.6")
        #expect(throws: GPUError.self) { try GPUOptions(json: #"{"protocol":"hip","device_name":"cuda:0"}"#) }
        #expect(throws: GPUError.self) { try GPUOptions(json: #"{"device_name":"mlx5_0"}"#) }
        #expect(throws: GPUError.self) { try GPUOptions(json: #"{"options":{"MC_GPU_WORKERS":"0"}}"#) }
        #expect(throws: GPUError.self) { try GPUOptions(json: "[1]") }
    }

    @Test("handles travel as upstream's upper-case hex; decoding accepts either case and rejects junk")
    func handleText() {
        let bytes: [UInt8] = (0..<64).map { UInt8($0 * 4 + 1) }
        let text = HandleText.encode(bytes)
        #expect(text.count == 128 && text.hasPrefix("0105090D") && text == text.uppercased())
        #expect(HandleText.decode(text) == bytes)
        #expect(HandleText.decode(text.lowercased()) == bytes)
        #expect(HandleText.decode("ABC") == nil)
        #expect(HandleText.decode("0G") == nil)
    }

    @Test("a peer descriptor: buffers with a 64-byte handle are reachable, offsets and bounds hold, upstream's form maps from the base")
    func peerDescriptor() throws {
        let handle = HandleText.encode([UInt8](repeating: 0xAB, count: 64))
        let json = """
        {"name":"10.0.0.1:15000","protocol":"nvlink_intra","gpu_boot_id":"b1","gpu_handle_type":"cuda_ipc",
         "buffers":[{"name":"cuda:0","addr":1000000,"length":4096,"shm_name":"\(handle)","gpu_offset":512,"gpu_alloc_size":8192},
                    {"name":"cuda:1","addr":2000000,"length":100,"shm_name":"\(handle)"},
                    {"name":"cpu:0","addr":3000000,"length":100,"protocol":"tcp"},
                    {"name":"cuda:2","addr":4000000,"length":100,"shm_name":"XYZ"}]}
        """
        let peer = try PeerSegment(json: json)
        #expect(peer.buffers.count == 2)
        #expect(peer.buffer(containing: 1_000_000 + 4000, length: 96)?.offset == 512)
        #expect(peer.buffer(containing: 1_000_000 + 4000, length: 97) == nil)
        #expect(peer.buffer(containing: UInt64.max - 1, length: 10) == nil)
        #expect(peer.buffer(containing: 3_000_000, length: 1) == nil)  // host memory: not through nvlink
        let upstream = try #require(peer.buffer(containing: 2_000_000, length: 100))
        #expect(upstream.offset == 0 && upstream.allocationSize == 100)
        #expect(peer.unreachableReason(mode: .intra, localBootID: "b1") == nil)
        #expect(peer.unreachableReason(mode: .intra, localBootID: "b2")?.contains("same host") == true)
        #expect(peer.unreachableReason(mode: .mnnvl, localBootID: "b1")?.contains("cuda_ipc handles") == true)
        #expect(peer.unreachableReason(mode: .hip, localBootID: "b1")?.contains("runs hip (hip_ipc)") == true)
        #expect(throws: GPUError.self) { try PeerSegment(json: "not json") }
    }

    @Test("hostile numbers in a peer descriptor leave the buffer out instead of trapping or reaching past the allocation")
    func hostileNumbers() throws {
        let handle = HandleText.encode([UInt8](repeating: 0xCD, count: 64))
        let max = UInt64.max
        let entries = [
            #""addr":1000,"length":4096,"gpu_offset":\#(max - 10),"gpu_alloc_size":\#(max)"#,   // offset + length overflows
            #""addr":\#(max - 100),"length":4096"#,                                                 // addr + length wraps
            #""addr":1000,"length":4096,"gpu_offset":512,"gpu_alloc_size":4096"#,                    // past the allocation
            #""addr":1000,"length":0"#,
            #""addr":1000,"length":\#(max),"gpu_offset":1"#,
        ]
        for entry in entries {
            let peer = try PeerSegment(json: #"{"buffers":[{"shm_name":"\#(handle)",\#(entry)}]}"#)
            #expect(peer.buffers.isEmpty, "\(entry)")
        }
        let fine = try PeerSegment(json: #"{"buffers":[{"shm_name":"\#(handle)","addr":1000,"length":4096,"gpu_offset":512,"gpu_alloc_size":4608}]}"#)
        #expect(fine.buffers.count == 1)
    }
}
