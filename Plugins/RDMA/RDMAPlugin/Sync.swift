import CRDMAShim

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A mutex with two conditions: completions (pollers wait on it) and repair work (the repair
/// thread waits on it), so a completion wakes no repair thread. The plugin shares no code with
/// the host, so it carries its own. Heap-allocated: pthread objects must not move.
final class Signal: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let repair = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        mutex.initialize(to: pthread_mutex_t())
        condition.initialize(to: pthread_cond_t())
        repair.initialize(to: pthread_cond_t())
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        pthread_cond_init(repair, nil)
    }

    /// Runs `body` with the mutex held.
    func locked<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Runs `body` if the mutex is free right now, else returns nil.
    func tryLocked<R>(_ body: () throws -> R) rethrows -> R? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (mutex held by the caller) at most `nanoseconds` for completions.
    func wait(nanoseconds: UInt64) { timedWait(condition, nanoseconds) }

    /// Waits (mutex held by the caller) at most `nanoseconds` for repair work.
    func waitForRepair(nanoseconds: UInt64) { timedWait(repair, nanoseconds) }

    private func timedWait(_ on: UnsafeMutablePointer<pthread_cond_t>, _ nanoseconds: UInt64) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let total = UInt64(now.tv_nsec) + nanoseconds
        var deadline = timespec(tv_sec: now.tv_sec + Int(total / 1_000_000_000), tv_nsec: Int(total % 1_000_000_000))
        pthread_cond_timedwait(on, mutex, &deadline)
    }

    /// Wakes every waiter for completions.
    func broadcast() { pthread_cond_broadcast(condition) }

    /// Wakes the repair thread.
    func wakeRepair() { pthread_cond_broadcast(repair) }
}

/// Starts a detached thread running `body`, named `name` (at most 15 bytes: what `top -H` and
/// /proc/<pid>/task/*/comm show).
func startThread(name: String, _ body: @escaping () -> Void) -> Bool {
    final class Box {
        let name: String
        let body: () -> Void
        init(_ name: String, _ body: @escaping () -> Void) { self.name = name; self.body = body }
    }
    let box = Unmanaged.passRetained(Box(name, body)).toOpaque()
    var thread = pthread_t()
    let started = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        rdma_name_thread(box.name)
        box.body()
        return nil
    }, box) == 0
    if started { pthread_detach(thread) } else { Unmanaged<Box>.fromOpaque(box).release() }
    return started
}

/// Monotonic nanoseconds.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
