import CSHMShim
import CTransportABI
import TransportPluginKit
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A peer's ownership proof request (a Connection handshake the shm plugin answers).
struct ProofRequest: Decodable {
    var shm_proof_nonce: String
}

/// Where this process answers ownership proofs: a small ring of nonce slots at stable addresses
/// for the life of the instance (an asker reads its slot right after our reply).
final class ProofSlots: @unchecked Sendable {
    static let nonceSize = 32
    static let count = 64
    private let storage = UnsafeMutableRawPointer.allocate(byteCount: nonceSize * count, alignment: 64)
    private var next = 0
    private let lock = Signal()

    init() {
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: Self.nonceSize * Self.count)
    }

    deinit { storage.deallocate() }

    /// Puts a nonce in the next slot; the slot's address.
    func store(_ nonce: [UInt8]) -> UInt64 {
        lock.locked {
            let slot = storage + next * Self.nonceSize
            next = (next + 1) % Self.count
            nonce.withUnsafeBytes { slot.copyMemory(from: $0.baseAddress!, byteCount: Self.nonceSize) }
            return UInt64(UInt(bitPattern: slot))
        }
    }
}

extension SHMInstance {
    /// Proves that `pid` is the process behind `segment`: sends it a fresh nonce over the host's
    /// handshake (to the segment's own handshake port), lets it put the nonce in its memory, and
    /// reads it back from `pid`. Only the process that answers the segment's port can place the
    /// nonce where `pid`'s memory shows it. nil when proven, else why not.
    func proveOwnership(of segment: String, pid: pid_t) -> String? {
        var generator = SystemRandomNumberGenerator()
        let nonce = (0..<ProofSlots.nonceSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let request = "{\"shm_proof_nonce\":\"\(JSONFragment.hex(nonce))\"}"
        let replyText: String
        do { replyText = try host.handshake(peer: segment, request: request, capacity: 1024, limit: 1 << 20) } catch {
            return "the proof handshake failed (\(error.message))"
        }
        struct Reply: Decodable { var shm_proof_addr: UInt64? }
        guard let address = (try? JSONDecoder().decode(Reply.self, from: Data(replyText.utf8)))?.shm_proof_addr, address != 0 else {
            return "its handshake port gave no proof address (not an shm engine of this version?)"
        }
        var seen = [UInt8](repeating: 0, count: ProofSlots.nonceSize)
        let read = seen.withUnsafeMutableBytes { shm_read_from(pid, UInt64(UInt(bitPattern: $0.baseAddress!)), address, UInt64(ProofSlots.nonceSize)) }
        guard read == ProofSlots.nonceSize else { return "reading the proof from pid \(pid) failed (\(String(cString: strerror(Int32(-read)))))" }
        return seen == nonce ? nil : "pid \(pid) does not hold the nonce its segment's port placed"
    }
}
