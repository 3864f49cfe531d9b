#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Lock rules (the host library's locks are not recursive):
// - never call, from inside a `withLock`/`withReadLock`/`withWriteLock` body, anything that takes
//   the same lock (e.g. `TransferEngine.localDescriptor` or `peer(_:)` inside the engine's state
//   lock): compute such values before taking the lock;
// - never hold a lock across network I/O or a call into a plugin that may block. Known exceptions,
//   to be removed: the TCP data server copies to and from the socket under the registry's read
//   lock (that is what keeps a buffer registered while a peer uses it), and the redis client
//   keeps its connection lock for one exchange (its total deadline bounds the wait);
// - order, where two are held at once: a batch's or channel's own lock may be taken under the
//   engine's state lock, never the other way round; the registry's lock is never held with another.
// Debug builds catch a re-entry on one thread at the moment it happens (an error-checking mutex,
// and a per-thread record for the reader-writer lock) instead of hanging.

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

/// A reader-writer lock that prefers writers, so an unregistration is not
/// starved by a stream of transfers that read the registration table.
final class ReadWriteLock: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)

    init() {
        lock.initialize(to: pthread_rwlock_t())
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func withReadLock<R>(_ body: () throws -> R) rethrows -> R {
        #if DEBUG
        holders.enter(mode: "read")
        defer { holders.leave() }
        #endif
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func withWriteLock<R>(_ body: () throws -> R) rethrows -> R {
        #if DEBUG
        holders.enter(mode: "write")
        defer { holders.leave() }
        #endif
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    #if DEBUG
    /// The threads holding (or about to take) this lock. A second read lock on one thread hangs
    /// as soon as a writer queues between the two (the lock prefers writers), which a test
    /// rarely hits; this record catches every re-entry.
    private let holders = LockHolders()
    #endif
}

#if DEBUG
/// Debug-build record of which threads hold a lock, to stop on a re-entry with its reason.
final class LockHolders: @unchecked Sendable {
    private let table = ConditionLock<[UInt: String]>([:])

    /// Records the calling thread; stops the process when it already holds the lock.
    func enter(mode: String) {
        let thread = UInt(pthread_self())
        table.withLock { holders in
            if let held = holders[thread] {
                preconditionFailure("ReadWriteLock: \(mode) lock requested by a thread that holds its \(held) lock (see the lock rules in Locks.swift)")
            }
            holders[thread] = mode
        }
    }

    /// Forgets the calling thread.
    func leave() {
        let thread = UInt(pthread_self())
        table.withLock { _ = $0.removeValue(forKey: thread) }
    }
}
#endif

/// The monotonic clock in nanoseconds.
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary fixed point (CLOCK_MONOTONIC).
    public static func nanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
