#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A mutex with a condition (more conditions on the same mutex come from `makeCondition`).
/// Heap-allocated, since pthread objects must not move; waits use the monotonic clock, so a
/// change of the wall clock neither cuts nor stretches them.
public final class Signal: @unchecked Sendable {
    @usableFromInline let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    @usableFromInline let condition: Condition

    /// A new unlocked mutex and its condition.
    public init() {
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = Condition(mutex)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the mutex held.
    @inlinable
    public func locked<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Takes the mutex (for a section whose exits are easier written with `defer`).
    @inlinable
    public func lock() { pthread_mutex_lock(mutex) }

    /// Releases the mutex taken with `lock`.
    @inlinable
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Runs `body` if the mutex is free right now, else returns nil.
    @inlinable
    public func tryLocked<R>(_ body: () throws -> R) rethrows -> R? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits on the main condition (mutex held by the caller) at most `nanoseconds`.
    @inlinable
    public func wait(nanoseconds: UInt64) { condition.wait(nanoseconds: nanoseconds) }

    /// Waits on the main condition (mutex held by the caller) until woken.
    @inlinable
    public func waitForever() { condition.wait() }

    /// Wakes every waiter of the main condition.
    @inlinable
    public func broadcast() { condition.broadcast() }

    /// Wakes one waiter of the main condition.
    @inlinable
    public func wakeOne() { condition.signal() }

    /// Another condition on this mutex (e.g. workers that must not be woken by completions).
    public func makeCondition() -> Condition { Condition(mutex) }

    /// A condition variable bound to a `Signal`'s mutex.
    public final class Condition: @unchecked Sendable {
        @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
        @usableFromInline let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

        fileprivate init(_ mutex: UnsafeMutablePointer<pthread_mutex_t>) {
            self.mutex = mutex
            condition.initialize(to: pthread_cond_t())
            var attributes = pthread_condattr_t()
            pthread_condattr_init(&attributes)
            pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
            pthread_cond_init(condition, &attributes)
            pthread_condattr_destroy(&attributes)
        }

        deinit {
            pthread_cond_destroy(condition)
            condition.deallocate()
        }

        /// Waits (the signal's mutex held) at most `nanoseconds`.
        public func wait(nanoseconds: UInt64) {
            let total = monotonicNanoseconds() &+ min(nanoseconds, UInt64(Int64.max) / 2)
            var deadline = timespec(tv_sec: Int(total / 1_000_000_000), tv_nsec: Int(total % 1_000_000_000))
            pthread_cond_timedwait(condition, mutex, &deadline)
        }

        /// Waits (the signal's mutex held) until woken.
        @inlinable
        public func wait() { pthread_cond_wait(condition, mutex) }

        /// Wakes every waiter.
        @inlinable
        public func broadcast() { pthread_cond_broadcast(condition) }

        /// Wakes one waiter.
        @inlinable
        public func signal() { pthread_cond_signal(condition) }
    }
}

/// Starts a detached thread named `name` (at most 15 bytes show in `top -H` and
/// /proc/PID/task/*/comm) running `body`; false when the system refuses a thread.
public func startThread(name: String = "", _ body: @escaping () -> Void) -> Bool {
    final class Box {
        let name: String
        let body: () -> Void
        init(_ name: String, _ body: @escaping () -> Void) { self.name = name; self.body = body }
    }
    let box = Unmanaged.passRetained(Box(name, body)).toOpaque()
    var thread = pthread_t()
    let started = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        if !box.name.isEmpty { nameThisThread(box.name) }
        box.body()
        return nil
    }, box) == 0
    if started { pthread_detach(thread) } else { Unmanaged<Box>.fromOpaque(box).release() }
    return started
}

/// Names the calling thread through /proc (pthread_setname_np is hidden from Swift's Glibc module).
private func nameThisThread(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    close(fd)
}

/// Monotonic nanoseconds.
public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
