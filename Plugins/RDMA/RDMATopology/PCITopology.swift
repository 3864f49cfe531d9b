#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where HCAs and GPUs sit on the PCI tree, for the `cuda:N` rows of the priority matrix: GPU
/// memory should leave through the NICs nearest to the GPU (GPUDirect RDMA reads and writes it
/// across the PCIe switch they share; a NIC behind another root port or socket goes through the
/// CPU's fabric).
public enum PCITopology {
    /// The device's position as the components of its sysfs path below `devices/`, e.g.
    /// ["pci0000:00", "0000:00:01.0", "0000:01:00.0"]; nil when the path cannot be resolved.
    public static func position(of sysfsPath: String) -> [String]? {
        guard let resolved = realpath(sysfsPath, nil) else { return nil }
        defer { free(resolved) }
        let components = String(cString: resolved).split(separator: "/").map(String.init)
        guard let start = components.firstIndex(of: "devices") else { return nil }
        return Array(components[(start + 1)...])
    }

    /// The HCA's PCI position (`<sysfs>/class/infiniband/<name>/device`).
    public static func hca(_ name: String, sysfs: String = "/sys") -> [String]? {
        position(of: "\(sysfs)/class/infiniband/\(name)/device")
    }

    /// A PCI function's position by bus id (`<sysfs>/bus/pci/devices/<id>`).
    public static func pciDevice(_ busID: String, sysfs: String = "/sys") -> [String]? {
        position(of: "\(sysfs)/bus/pci/devices/\(busID.lowercased())")
    }

    /// Bridges between two devices: the steps from each up to their nearest common ancestor.
    /// Two functions of one device are 0 apart, a GPU and a NIC under one PCIe switch 4 (up two
    /// ports, down two), devices under different host bridges more.
    public static func distance(_ a: [String], _ b: [String]) -> Int {
        var common = 0
        while common < min(a.count, b.count) && a[common] == b[common] { common += 1 }
        // Functions of one device (same bus:device, other function) share their parent bridge.
        if common == a.count - 1 && common == b.count - 1, sameDevice(a[common], b[common]) { return 0 }
        return (a.count - common) + (b.count - common)
    }

    private static func sameDevice(_ x: String, _ y: String) -> Bool {
        guard let dx = x.lastIndex(of: "."), let dy = y.lastIndex(of: ".") else { return false }
        return x[..<dx] == y[..<dy]
    }

    /// `cuda:N` rows: for each GPU (by bus id, in CUDA's order), the HCAs at the smallest PCI
    /// distance; every HCA when no position is known. Upstream counts only HCAs at distance 0
    /// (its "same switch" check compares path text), which in practice prefers none.
    public static func gpuRows(gpuBusIDs: [String], hcas: [[String]?], sysfs: String = "/sys") -> [String: [Int]] {
        var rows: [String: [Int]] = [:]
        for (index, busID) in gpuBusIDs.enumerated() {
            let all = Array(hcas.indices)
            guard let gpu = pciDevice(busID, sysfs: sysfs) else { rows["cuda:\(index)"] = all; continue }
            let distances = hcas.map { $0.map { distance(gpu, $0) } }
            guard let nearest = distances.compactMap({ $0 }).min() else { rows["cuda:\(index)"] = all; continue }
            rows["cuda:\(index)"] = all.filter { distances[$0] == nearest }
        }
        return rows
    }
}
