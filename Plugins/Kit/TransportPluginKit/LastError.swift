import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The ABI's `last_error`: the text of the last failed call on the calling thread, per instance.
/// Each thread keeps a few slots (instances are identified by a number never reused, so a
/// destroyed instance's slot never answers for a new one at the same address).
enum LastError {
    static let capacity = 1024
    private static let slotsPerThread = 16

    /// A thread's slots, freed when the thread exits.
    private final class Slots {
        var entries: [(instance: UInt64, text: UnsafeMutablePointer<CChar>)] = []
        deinit { for entry in entries { entry.text.deallocate() } }
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { raw in
            guard let raw else { return }
            Unmanaged<Slots>.fromOpaque(raw).release()
        }
        return key
    }()

    private static let nextInstance = Atomic<UInt64>(1)

    /// A number for a new instance.
    static func newInstanceID() -> UInt64 { nextInstance.add(1, ordering: .relaxed).oldValue }

    private static var slots: Slots {
        if let raw = pthread_getspecific(key) { return Unmanaged<Slots>.fromOpaque(raw).takeUnretainedValue() }
        let slots = Slots()
        pthread_setspecific(key, Unmanaged.passRetained(slots).toOpaque())
        return slots
    }

    private static func slot(for instance: UInt64) -> UnsafeMutablePointer<CChar> {
        let slots = slots
        if let found = slots.entries.first(where: { $0.instance == instance }) { return found.text }
        if slots.entries.count >= slotsPerThread { slots.entries.removeFirst().text.deallocate() }
        let text = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
        text[0] = 0
        slots.entries.append((instance, text))
        return text
    }

    /// Records `message` for `instance` on the calling thread (cut to 1023 bytes).
    static func set(_ message: String, instance: UInt64) {
        let text = slot(for: instance)
        var bytes = Array(message.utf8.prefix(capacity - 1))
        // A cut inside a multi-byte character would leave invalid UTF-8: drop that character.
        if message.utf8.count > bytes.count {
            while let last = bytes.last, last >= 0x80 {
                bytes.removeLast()
                if last >= 0xC0 { break }
            }
        }
        bytes.withUnsafeBytes { UnsafeMutableRawPointer(text).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        text[bytes.count] = 0
    }

    /// The calling thread's last error text for `instance` ("" when none).
    static func text(instance: UInt64) -> UnsafePointer<CChar> { UnsafePointer(slot(for: instance)) }
}
