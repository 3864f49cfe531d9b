import CRDMAShim
import RDMATopology

extension PCITopology {
    /// The CUDA devices' bus ids from the driver (empty without one).
    static func cudaBusIDs() -> [String] {
        let size = Int(RDMA_BUS_ID_SIZE), capacity = 64
        var ids = [CChar](repeating: 0, count: size * capacity)
        let count = Int(ids.withUnsafeMutableBufferPointer { rdma_cuda_bus_ids($0.baseAddress, Int32(capacity)) })
        guard count > 0 else { return [] }
        return (0..<count).map { i in
            String(decoding: ids[(i * size)..<((i + 1) * size)].prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
}
