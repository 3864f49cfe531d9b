// swift-tools-version:6.0
//
// The Swift Mooncake-compatible Transfer Engine.
//
// Host: `TransferEngine` (library) + `transfer-engine` (CLI), TCP built in.
// Transport plugins are separate `libtransport_<protocol>.so` files that only
// speak the C vtable in `CTransportABI`. A plugin target is added only when its
// system dependency is present (header check) or forced with TE_WITH_<PROTOCOL>=0/1.
// The manifest cache does not notice new headers: build scripts pass
// `--manifest-cache none`.
import Foundation
import PackageDescription

let environment = ProcessInfo.processInfo.environment

/// Whether an optional plugin is built: `TE_WITH_<NAME>` wins, else the header's presence.
func pluginEnabled(_ name: String, header: String) -> Bool {
    if let forced = environment["TE_WITH_\(name)"] {
        return ["1", "on", "yes", "true"].contains(forced.lowercased())
    }
    return FileManager.default.fileExists(atPath: header)
}

var products: [Product] = [
    .library(name: "TransferEngine", targets: ["TransferEngine"]),
    // The C API (transfer_engine_c.h), as libtransfer_engine_c.so for C callers and the Python package.
    .library(name: "transfer_engine_c", type: .dynamic, targets: ["TransferEngineC"]),
    .executable(name: "transfer-engine", targets: ["transfer-engine"]),
]

var targets: [Target] = [
    // The plugin ABI: one header, no code. Plugins and host both depend on it.
    .target(name: "CTransportABI", path: "Sources/CTransportABI"),
    // GNU libc extensions (accept4, dladdr, thread names) that Swift's Glibc module hides.
    .target(name: "CTransferEngineShims", path: "Sources/CTransferEngineShims"),
    .target(
        name: "TransferEngine",
        dependencies: [
            "CTransportABI",
            "CTransferEngineShims",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "DequeModule", package: "swift-collections"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            "TransferEngineCrypto",
        ],
        path: "Sources/TransferEngine"
    ),
    // HMAC for peer authentication (swift-crypto), apart so Foundation does not leak into the engine.
    .target(name: "TransferEngineCrypto", dependencies: [.product(name: "Crypto", package: "swift-crypto")],
            path: "Sources/TransferEngineCrypto"),
    // The embedded HTTP metadata server (`metadata-server`), on swift-nio's HTTP/1.1 codec; apart
    // so the engine library (and the C API built from it) carries no event loop.
    .target(
        name: "TransferEngineMetadataServer",
        dependencies: [
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ],
        path: "Sources/TransferEngineMetadataServer"
    ),
    // `transfer-engine plugins --check`: the conformance battery for a plugin file (child processes,
    // two engines in two processes); apart so the engine library carries no process spawning.
    .target(name: "TransferEnginePluginCheck", dependencies: ["TransferEngine", .product(name: "Logging", package: "swift-log")],
            path: "Sources/TransferEnginePluginCheck"),
    .target(name: "CTransferEngineC", path: "Sources/CTransferEngineC"),
    .target(
        name: "TransferEngineC",
        dependencies: ["TransferEngine", "CTransferEngineC"],
        path: "Sources/TransferEngineC"
    ),
    .executableTarget(
        name: "transfer-engine",
        dependencies: [
            "TransferEngine",
            "TransferEngineMetadataServer",
            "TransferEnginePluginCheck",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ],
        path: "Sources/transfer-engine"
    ),
    .testTarget(
        name: "TransferEngineTests",
        dependencies: ["TransferEngine", "TransferEngineMetadataServer", "CTransportABI"],
        path: "Tests/TransferEngineTests",
        exclude: ["Fixtures", "Interop/official_peer.py"]
    ),
]

// The plugin kit: the C vtable, per-thread last errors, te_buffer answers, host services, locks and
// threads, so a plugin is plain Swift (a `TransportInstance`). Depends only on the ABI header (and
// swift-collections' Deque); every plugin below depends on it, its own C shim and the header.
targets.append(.target(name: "TransportPluginKit", dependencies: ["CTransportABI", .product(name: "DequeModule", package: "swift-collections")],
                       path: "Plugins/Kit/TransportPluginKit"))

// Same-host transport (cross-memory attach): no -dev package needed, so it always builds.
products.append(.library(name: "transport_shm", type: .dynamic, targets: ["SHMPlugin"]))
targets += [
    .target(name: "CSHMShim", path: "Plugins/SHM/CSHMShim"),
    .target(name: "SHMPlugin", dependencies: ["CTransportABI", "CSHMShim", "TransportPluginKit"], path: "Plugins/SHM/SHMPlugin"),
]

// RDMA over libibverbs (libibverbs-dev): RC queue pairs, one-sided READ/WRITE.
if pluginEnabled("RDMA", header: "/usr/include/infiniband/verbs.h") {
    products.append(.library(name: "transport_rdma", type: .dynamic, targets: ["RDMAPlugin"]))
    targets += [
        .target(name: "CRDMAShim", path: "Plugins/RDMA/CRDMAShim", linkerSettings: [.linkedLibrary("ibverbs"), .linkedLibrary("dl")]),
        // The plugin's PCI-tree logic, apart so its tests link without a second plugin entry point.
        .target(name: "RDMATopology", path: "Plugins/RDMA/RDMATopology"),
        .target(name: "RDMAPlugin", dependencies: ["CTransportABI", "CRDMAShim", "RDMATopology", "TransportPluginKit"], path: "Plugins/RDMA/RDMAPlugin"),
        .testTarget(name: "RDMATopologyTests", dependencies: ["RDMATopology"], path: "Tests/RDMATopologyTests"),
    ]
}

// CXL memory pools (libcxl-dev + libdaxctl-dev): device-dax mapped by every engine on the pool.
if pluginEnabled("CXL", header: "/usr/include/daxctl/libdaxctl.h") && FileManager.default.fileExists(atPath: "/usr/include/cxl/libcxl.h") {
    products.append(.library(name: "transport_cxl", type: .dynamic, targets: ["CXLPlugin"]))
    targets += [
        .target(name: "CCXLShim", path: "Plugins/CXL/CCXLShim", linkerSettings: [.linkedLibrary("cxl"), .linkedLibrary("daxctl")]),
        .target(name: "CXLPlugin", dependencies: ["CTransportABI", "CCXLShim", "TransportPluginKit"], path: "Plugins/CXL/CXLPlugin"),
    ]
}

// EFA over libfabric (libfabric-dev): `efa` on AWS, any RDM+RMA provider elsewhere.
if pluginEnabled("EFA", header: "/usr/include/rdma/fabric.h") {
    products.append(.library(name: "transport_efa", type: .dynamic, targets: ["EFAPlugin"]))
    targets += [
        .target(name: "CEFAShim", path: "Plugins/EFA/CEFAShim", linkerSettings: [.linkedLibrary("fabric")]),
        .target(name: "EFAPlugin", dependencies: ["CTransportABI", "CEFAShim", "TransportPluginKit"], path: "Plugins/EFA/EFAPlugin"),
    ]
}

// NVMe-oF over libnvme (libnvme-dev): segments backed by NVMe namespaces, direct I/O.
if pluginEnabled("NVMEOF", header: "/usr/include/libnvme.h") {
    products.append(.library(name: "transport_nvmeof", type: .dynamic, targets: ["NVMeoFPlugin"]))
    targets += [
        .target(name: "CNVMeoFShim", path: "Plugins/NVMeoF/CNVMeoFShim", linkerSettings: [.linkedLibrary("nvme")]),
        .target(name: "NVMeoFPlugin", dependencies: ["CTransportABI", "CNVMeoFShim", "TransportPluginKit"], path: "Plugins/NVMeoF/NVMeoFPlugin"),
    ]
}

// GPU transports, the runtimes bound at run time with dlopen: nvlink (multi-node NVLink, CUDA fabric
// handles) and nvlink_intra (CUDA IPC on one host) always build (Debian has no CUDA headers; the shim
// declares the driver API it uses); hip (HIP IPC) builds with libamdhip64-dev, whose header types the
// HIP entry points. One module, one plugin file per protocol; the host tells the plugin which it runs.
products += [
    .library(name: "transport_nvlink", type: .dynamic, targets: ["GPUPlugin"]),
    .library(name: "transport_nvlink_intra", type: .dynamic, targets: ["GPUPlugin"]),
]
// Whether the HIP header is there reaches the C shim as a define, not `__has_include`: a changed
// define changes the compile command, so installing or removing libamdhip64-dev rebuilds the shim
// (a header that merely appears is invisible to the build's dependency tracking).
let hipHeaders = pluginEnabled("HIP", header: "/usr/include/hip/hip_runtime_api.h")
if hipHeaders {
    products.append(.library(name: "transport_hip", type: .dynamic, targets: ["GPUPlugin"]))
}
targets += [
    .target(name: "CGPUShim", path: "Plugins/GPU/CGPUShim",
            cSettings: [.define("TE_HAVE_HIP_HEADERS", to: hipHeaders ? "1" : "0")], linkerSettings: [.linkedLibrary("dl")]),
    .target(name: "GPUPlugin", dependencies: ["CTransportABI", "CGPUShim", "TransportPluginKit"], path: "Plugins/GPU/GPUPlugin"),
    .testTarget(name: "GPUPluginTests", dependencies: ["GPUPlugin"], path: "Tests/GPUPluginTests"),
]

// ascend (Huawei NPUs): CANN bound at run time with dlopen (no Debian package carries it; the shim
// declares the HIXL C API and the few ACL calls it uses), so it always builds.
products.append(.library(name: "transport_ascend", type: .dynamic, targets: ["AscendPlugin"]))
targets += [
    .target(name: "CAscendShim", path: "Plugins/Ascend/CAscendShim", linkerSettings: [.linkedLibrary("dl")]),
    .target(name: "AscendRankInfo", dependencies: ["TransportPluginKit"], path: "Plugins/Ascend/AscendRankInfo"),
    .target(name: "AscendPlugin", dependencies: ["CTransportABI", "CAscendShim", "TransportPluginKit", "AscendRankInfo"], path: "Plugins/Ascend/AscendPlugin"),
    .testTarget(name: "AscendPluginTests", dependencies: ["AscendRankInfo"], path: "Tests/AscendPluginTests"),
]

// libFuzzer harnesses (Fuzz/): built only by scripts/fuzz.sh, with TE_FUZZ=1 and -sanitize=fuzzer,address
// (libFuzzer provides main; an ordinary build would fail to link them).
if environment["TE_FUZZ"] == "1" {
    products.append(.executable(name: "te-fuzz", targets: ["te-fuzz"]))
    targets.append(.executableTarget(name: "te-fuzz", dependencies: ["TransferEngine", "CTransportABI", "GPUPlugin", .product(name: "Logging", package: "swift-log")],
                                     path: "Fuzz/Sources"))
}

let package = Package(
    name: "swift-transfer-engine",
    products: products,
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.81.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.1.0"),
    ],
    targets: targets
)
