import CNVMeoFShim
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The probe's answer: whether every configured namespace can be reached, without connecting any.
enum Probe {
    case ready(String)
    case absent(reason: String, hint: String)

    static let fabricsHint = "load the kernel's NVMe-oF host (modprobe nvme-tcp or nvme-rdma) and check the target's address, port and NQN (nvme discover -t tcp -a <address> -s <port>)"

    static func run(_ options: NVMeoFOptions) -> Probe {
        var found: [String] = []
        for source in options.sources {
            switch source {
            case .path(let path):
                guard case .success(let namespace) = Namespace.open(path, direct: options.oDirect) else {
                    return .absent(reason: "namespace \(path): \(String(cString: strerror(errno == 0 ? ENOENT : errno)))",
                                   hint: "MC_NVMEOF_NAMESPACES paths must be readable and writable block devices or files")
                }
                found.append("\(path) (\(namespace.size) bytes)")
            case .fabric(let target):
                if !SubsystemTable.namespaces(of: target.nqn).isEmpty {
                    found.append("\(target.uri) (connected)")
                    continue
                }
                if let missing = fabricsMissing() { return missing }
                // A discovery log from the target's port tells whether it offers the subsystem (the temporary connection is closed).
                let discovery = FabricTarget(trtype: target.trtype, traddr: target.traddr, trsvcid: target.trsvcid,
                                             nqn: "nqn.2014-08.org.nvmexpress.discovery", nsid: nil, hostTraddr: target.hostTraddr)
                switch Discovery.subsystems(at: discovery) {
                case .failure(let error): return .absent(reason: "\(error)", hint: fabricsHint)
                case .success(let offered):
                    guard offered.contains(where: { $0.nqn == target.nqn }) else {
                        return .absent(reason: "the target at \(target.trtype) \(target.traddr):\(target.trsvcid) does not offer \(target.nqn) (it offers: \(offered.map(\.nqn).joined(separator: ", ")))",
                                       hint: fabricsHint)
                    }
                    found.append(target.uri)
                }
            }
        }
        for controller in options.discovery {
            if let missing = fabricsMissing() { return missing }
            switch Discovery.subsystems(at: controller) {
            case .failure(let error): return .absent(reason: "\(error)", hint: fabricsHint)
            case .success(let offered):
                if offered.isEmpty { return .absent(reason: "the discovery controller at \(controller.traddr):\(controller.trsvcid) lists no NVM subsystem", hint: fabricsHint) }
                found += offered.map(\.uri)
            }
        }
        if found.isEmpty { return .ready("no namespaces of its own: reaches peers' namespaces directly or through their owners") }
        return .ready("namespaces: \(found.joined(separator: ", "))")
    }

    private static func fabricsMissing() -> Probe? {
        let status = nvmeof_fabrics_available()
        guard status != 0 else { return nil }
        return .absent(reason: "no NVMe-oF host in this kernel (/dev/nvme-fabrics: \(String(cString: strerror(-status))))", hint: fabricsHint)
    }
}
