import DequeModule

/// Threads that take jobs from one queue, oldest first: a plugin's copy or I/O threads.
public final class WorkerPool<Job>: @unchecked Sendable {
    private let signal = Signal()
    private var jobs = Deque<Job>()
    private var stopping = false
    private var running = 0

    /// A pool with no threads yet.
    public init() {}

    /// Starts `count` threads named `name`. Each calls `makeWorker` once, on its own thread (for
    /// per-thread setup such as binding a device), and runs what it returns for every job it
    /// takes. False when the system refused a thread (those started run until `stop`).
    public func start(count: Int, name: String, _ makeWorker: @escaping () -> (Job) -> Void) -> Bool {
        for _ in 0..<max(count, 1) {
            signal.locked { running += 1 }
            let started = startThread(name: name) { [self] in
                let work = makeWorker()
                while let job = next() { work(job) }
                signal.locked {
                    running -= 1
                    signal.broadcast()
                }
            }
            guard started else {
                signal.locked { running -= 1 }
                return false
            }
        }
        return true
    }

    /// Queues one job.
    public func enqueue(_ job: Job) {
        signal.locked {
            jobs.append(job)
            signal.wakeOne()
        }
    }

    /// Queues jobs in order.
    public func enqueue(contentsOf batch: some Collection<Job>) {
        guard !batch.isEmpty else { return }
        signal.locked {
            jobs.append(contentsOf: batch)
            if batch.count > 1 { signal.broadcast() } else { signal.wakeOne() }
        }
    }

    /// Lets the threads finish what is queued, then waits until they have exited.
    public func stop() {
        signal.locked {
            stopping = true
            signal.broadcast()
            while running > 0 { signal.wait(nanoseconds: 100_000_000) }
        }
    }

    private func next() -> Job? {
        signal.locked {
            while jobs.isEmpty && !stopping { signal.waitForever() }
            return jobs.popFirst()
        }
    }
}
