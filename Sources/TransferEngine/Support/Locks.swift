#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Lock rules (the host library's locks are not recursive):
// - never call, from inside a `withLock`/`withReadLock`/`withWriteLock` body, anything that takes
//   the same lock (e.g. `TransferEngine.localDescriptor` or `peer(_:)` inside the engine's state
//   lock): compute such values before taking the lock;
// - never hold a lock across network I/O or a call into a plugin that may block (a buffer in use
//   by a peer is pinned with a count instead, see MemoryRegistry; a metadata client takes a
//   connection out of its pool for an exchange);
// - order, where two are held at once: a batch's or channel's own lock may be taken under the
//   engine's state lock, never the other way round; the registry's lock is never held with another.
// Debug builds catch a re-entry on one thread at the moment it happens (an error-checking mutex)
// instead of hanging.

/// A mutex plus condition variable, for threads that block until state changes.
///
/// Swift's `Mutex` has no condition variable; the data path blocks real
/// threads (not tasks), so a pthread pair is the right tool. The pthread
/// objects live at stable heap addresses: passing `&property` to C would start
/// a Swift exclusive access lasting the whole (blocking) call.
final class ConditionLock<State>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Heap storage, not a stored `var`: the mutex already makes every access exclusive, and a
    /// class property would add a runtime exclusivity check (a thread-local lookup) to each
    /// lock use, about a tenth of a small synchronous transfer's CPU time.
    private let state = UnsafeMutablePointer<State>.allocate(capacity: 1)

    init(_ initial: State) {
        state.initialize(to: initial)
        mutex.initialize(to: pthread_mutex_t())
        condition.initialize(to: pthread_cond_t())
        #if DEBUG
        var mutexAttributes = pthread_mutexattr_t()
        pthread_mutexattr_init(&mutexAttributes)
        pthread_mutexattr_settype(&mutexAttributes, Int32(PTHREAD_MUTEX_ERRORCHECK))
        pthread_mutex_init(mutex, &mutexAttributes)
        pthread_mutexattr_destroy(&mutexAttributes)
        #else
        pthread_mutex_init(mutex, nil)
        #endif
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Runs `body` with the lock held; with `notify`, wakes every waiter afterwards.
    @discardableResult
    func withLock<R>(notify: Bool = false, _ body: (inout State) throws -> R) rethrows -> R {
        lock()
        defer {
            if notify { pthread_cond_broadcast(condition) }
            pthread_mutex_unlock(mutex)
        }
        return try body(&state.pointee)
    }

    /// Wakes one waiter (for hand-offs where any single waiter can take the work).
    func signalOne() {
        lock()
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Wakes every waiter (after a change decided under an earlier lock acquisition).
    func notifyAll() {
        lock()
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Waits until `ready` returns a value or the monotonic deadline (ns) passes.
    func wait<R>(deadline: UInt64? = nil, until ready: (inout State) -> R?) -> R? {
        lock()
        defer { pthread_mutex_unlock(mutex) }
        while true {
            if let value = ready(&state.pointee) { return value }
            if let deadline {
                if MonotonicClock.nanoseconds() >= deadline { return nil }
                var ts = timespec()
                ts.tv_sec = Int(deadline / 1_000_000_000)
                ts.tv_nsec = Int(deadline % 1_000_000_000)
                pthread_cond_timedwait(condition, mutex, &ts)
            } else {
                pthread_cond_wait(condition, mutex)
            }
        }
    }
}

extension ConditionLock {
    /// Takes the mutex; in debug builds a second acquisition on the same thread stops the
    /// process with the reason instead of deadlocking.
    @inline(__always)
    private func lock() {
        let rc = pthread_mutex_lock(mutex)
        assert(rc != EDEADLK, "ConditionLock<\(State.self)> taken again by the thread that holds it (see the lock rules in Locks.swift)")
    }
}

/// The monotonic clock in nanoseconds.
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary fixed point (CLOCK_MONOTONIC).
    public static func nanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
