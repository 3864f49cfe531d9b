#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CTransferEngineShims

/// Starts detached OS threads for blocking work (socket loops, data lanes).
///
/// The data path uses blocking system calls on dedicated threads so bytes go
/// straight between the socket and registered memory; Swift concurrency's
/// cooperative pool must not be blocked that way.
enum OSThread {
    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    /// Runs `body` on a new detached thread. Throws if the thread cannot be created.
    static func spawn(name: String, _ body: @escaping @Sendable () -> Void) throws {
        let box = Unmanaged.passRetained(Box { te_set_thread_name(name); body() }).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            throw EngineError.system(call: "pthread_create", errno: rc)
        }
        pthread_detach(thread)
    }
}
