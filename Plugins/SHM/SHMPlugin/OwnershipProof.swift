import CSHMShim
import CTransportABI
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

/// Lower-case hex for the proof nonce (the plugin shares no code with the host).
enum JSONHex {
    static func encode(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes { out.append(digits[Int(byte >> 4)]); out.append(digits[Int(byte & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0, chars.count <= 256 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        var out: [UInt8] = []
        var i = 0
        while i < chars.count {
            guard let high = value(chars[i]), let low = value(chars[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }
}

/// Where this process answers ownership proofs: a small ring of nonce slots at stable addresses
/// for the life of the instance (an asker reads its slot right after our reply).
final class ProofSlots: @unchecked Sendable {
    static let nonceSize = 32
    static let count = 64
    private let storage = UnsafeMutableRawPointer.allocate(byteCount: nonceSize * count, alignment: 64)
    private var next = 0
    private var mutex = pthread_mutex_t()

    init() {
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: Self.nonceSize * Self.count)
        pthread_mutex_init(&mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(&mutex)
        storage.deallocate()
    }

    /// Puts a nonce in the next slot; the slot's address.
    func store(_ nonce: [UInt8]) -> UInt64 {
        pthread_mutex_lock(&mutex)
        let slot = storage + next * Self.nonceSize
        next = (next + 1) % Self.count
        nonce.withUnsafeBytes { slot.copyMemory(from: $0.baseAddress!, byteCount: Self.nonceSize) }
        pthread_mutex_unlock(&mutex)
        return UInt64(UInt(bitPattern: slot))
    }
}

extension SHMInstance {
    /// Proves that `pid` is the process behind `segment`: sends it a fresh nonce over the host's
    /// handshake (to the segment's own handshake port), lets it put the nonce in its memory, and
    /// reads it back from `pid`. Only the process that answers the segment's port can place the
    /// nonce where `pid`'s memory shows it. nil when proven, else why not.
    func proveOwnership(of segment: String, pid: pid_t) -> String? {
        guard let host, let send = host.pointee.handshake_send else { return "the host offers no handshake to verify it" }
        var generator = SystemRandomNumberGenerator()
        let nonce = (0..<ProofSlots.nonceSize).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let request = "{\"shm_proof_nonce\":\"\(JSONHex.encode(nonce))\"}"
        var capacity = 1024
        var replyText = ""
        var status = TE_ERR_BUFFER_TOO_SMALL
        for _ in 0..<2 where status == TE_ERR_BUFFER_TOO_SMALL {
            let storage = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
            defer { storage.deallocate() }
            var reply = te_buffer(data: storage, capacity: capacity, length: 0)
            status = segment.withCString { name in request.withCString { send(host.pointee.host_context, name, $0, &reply) } }
            if status == TE_OK { replyText = String(cString: storage) }
            capacity = min(reply.length + 1, 1 << 20)
        }
        guard status == TE_OK else { return "the proof handshake failed (status \(status))" }
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
