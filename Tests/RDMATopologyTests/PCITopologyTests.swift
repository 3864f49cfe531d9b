import Foundation
import Testing
import RDMATopology

/// The PCI-distance rule behind the `cuda:N` rows of the priority matrix, over a sysfs tree laid
/// out like a two-socket GPU server's (directories and symbolic links as the kernel makes them).
@Suite("rdma plugin: GPU rows of the priority matrix from the PCI tree")
struct PCITopologyTests {
    /// A fake sysfs: socket 0 has a PCIe switch with GPU 0 (0000:03:00.0) and mlx5_0 (0000:04:00.0,
    /// two functions) on two downstream ports; socket 1 has GPU 1 and mlx5_2 on their own root
    /// ports; rxe0 is virtual (no device link).
    final class FakeSysfs {
        let root: URL
        init() throws {
            root = FileManager.default.temporaryDirectory.appendingPathComponent("sysfs-\(UUID().uuidString)")
            let devices: [String: String] = [
                "0000:03:00.0": "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
                "0000:04:00.0": "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
                "0000:04:00.1": "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.1",
                "0000:81:00.0": "pci0000:80/0000:80:01.0/0000:81:00.0",
                "0000:82:00.0": "pci0000:80/0000:80:02.0/0000:82:00.0",
            ]
            let files = FileManager.default
            for (busID, path) in devices {
                try files.createDirectory(at: root.appendingPathComponent("devices/\(path)"), withIntermediateDirectories: true)
                try files.createDirectory(at: root.appendingPathComponent("bus/pci/devices"), withIntermediateDirectories: true)
                try files.createSymbolicLink(atPath: root.appendingPathComponent("bus/pci/devices/\(busID)").path,
                                             withDestinationPath: "../../../devices/\(path)")
            }
            for (hca, busID) in [("mlx5_0", "0000:04:00.0"), ("mlx5_1", "0000:04:00.1"), ("mlx5_2", "0000:82:00.0")] {
                try files.createDirectory(at: root.appendingPathComponent("class/infiniband/\(hca)"), withIntermediateDirectories: true)
                try files.createSymbolicLink(atPath: root.appendingPathComponent("class/infiniband/\(hca)/device").path,
                                             withDestinationPath: "../../../devices/\(devices[busID]!)")
            }
            try files.createDirectory(at: root.appendingPathComponent("class/infiniband/rxe0"), withIntermediateDirectories: true)
        }
        deinit { try? FileManager.default.removeItem(at: root) }
        var path: String { root.path }
    }

    @Test("distances: functions of one device 0, siblings 2, across one switch 4, across host bridges more")
    func distances() throws {
        let sysfs = try FakeSysfs()
        let gpu0 = try #require(PCITopology.pciDevice("0000:03:00.0", sysfs: sysfs.path))
        #expect(gpu0 == ["pci0000:00", "0000:00:01.0", "0000:01:00.0", "0000:02:00.0", "0000:03:00.0"])
        let nic0 = try #require(PCITopology.hca("mlx5_0", sysfs: sysfs.path))
        let nic1 = try #require(PCITopology.hca("mlx5_1", sysfs: sysfs.path))
        let nic2 = try #require(PCITopology.hca("mlx5_2", sysfs: sysfs.path))
        #expect(PCITopology.distance(nic0, nic1) == 0)
        #expect(PCITopology.distance(gpu0, nic0) == 4)
        #expect(PCITopology.distance(gpu0, nic2) == 8)
        #expect(PCITopology.distance(nic2, nic2) == 0)
        #expect(PCITopology.hca("rxe0", sysfs: sysfs.path) == nil)
        #expect(PCITopology.pciDevice("0000:ff:00.0", sysfs: sysfs.path) == nil)
    }

    @Test("each GPU prefers the HCAs nearest to it; unknown positions fall back to every HCA")
    func gpuRows() throws {
        let sysfs = try FakeSysfs()
        let hcas = ["mlx5_0", "mlx5_1", "mlx5_2", "rxe0"].map { PCITopology.hca($0, sysfs: sysfs.path) }
        // CUDA_VISIBLE_DEVICES may list GPU 1 first; the third GPU is one sysfs does not know.
        let rows = PCITopology.gpuRows(gpuBusIDs: ["0000:82:00.0", "0000:03:00.0", "0000:99:00.0"], hcas: hcas, sysfs: sysfs.path)
        #expect(rows["cuda:0"] == [2])
        #expect(rows["cuda:1"] == [0, 1])
        #expect(rows["cuda:2"] == [0, 1, 2, 3])
        #expect(PCITopology.gpuRows(gpuBusIDs: ["0000:03:00.0"], hcas: [nil, nil], sysfs: sysfs.path)["cuda:0"] == [0, 1])
        #expect(PCITopology.gpuRows(gpuBusIDs: [], hcas: hcas, sysfs: sysfs.path).isEmpty)
    }
}
