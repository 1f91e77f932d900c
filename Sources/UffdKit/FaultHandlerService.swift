import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The process's handler service thread: the work readers must not do themselves because it
/// allocates (adopting a forked child, reporting a failure).
///
/// Why: with EVENT_FORK, glibc's fork() holds the malloc locks while the kernel waits for a
/// reader to read the fork event. A reader that allocates anywhere between reading one message
/// and reading the next (creating the previous child's handler, appending to the failure log,
/// an `onFailure` callback) can wait for those locks while the fork waits for it: a deadlock.
/// So a reader only writes a fixed-size record into a pipe (a syscall; no allocation, no lock
/// a forking thread holds) and goes on reading; this thread does the allocating work.
///
/// One per process (made on the first EVENT_FORK handler's start, before it returns, so before any fork
/// event); a forked child that runs handlers gets its own. Records keep their order, so a
/// ``flush()`` (a barrier record) waits for every record posted before it.
final class HandlerService: @unchecked Sendable {
    /// One unit of work (plain data; at most PIPE_BUF bytes, so each write is atomic).
    struct Record {
        enum Kind: UInt32 { case failure = 1, fork = 2, barrier = 3 }
        var kind: UInt32 = 0
        /// The reader's error slot holding the policy's error, or -1.
        var slot: Int32 = -1
        /// failure/fork: the posting Reader (retained); barrier: the sem_t to post.
        var target: UnsafeMutableRawPointer? = nil
        var msg = uffd_msg()
        var res = cuffd_resolution()
    }

    /// The pipe (internal for tests: a forked child must not keep the parent's).
    let readFD: Int32
    let writeFD: Int32
    private let pid: pid_t
    /// Set in a forked child once the parent's pipe is closed: its fd numbers may be reused.
    private let closed = Atomic<Bool>(false)
    /// Records posted and not yet handled.
    private let queued = Atomic<Int>(0)
    /// How many failure records may be queued at once.
    private let failureLimit: Int
    /// Set (non-nil) on readers and the service thread: they never wait for the service.
    let threadKey: pthread_key_t

    private static let current = Mutex<HandlerService?>(nil)

    /// The running service of this process, started on first use; nil when it cannot be made
    /// (readers then do the work themselves, as before).
    static func running() -> HandlerService? {
        current.withLock { s in
            if let live = s, live.pid == getpid() { return live }
            // First use, or a forked child (the service thread did not survive the fork). The
            // parent's pipe came along with the fork (O_CLOEXEC closes on exec only): nothing
            // in this process reads or writes it any more, so close it rather than leak two fds
            // for every generation of handlers.
            s?.closeInForkedChild()
            s = HandlerService()
            return s
        }
    }

    private init?() {
        var fds: [Int32] = [-1, -1]
        let capacity = cuffd_service_pipe(&fds, 1 << 20)
        guard capacity > 0 else { return nil }
        readFD = fds[0]
        writeFD = fds[1]
        // Failure reports may fill half of the pipe; the rest stays for fork events and barriers.
        failureLimit = Swift.max(1, Int(capacity) / MemoryLayout<Record>.size / 2)
        pid = getpid()
        var key = pthread_key_t()
        guard pthread_key_create(&key, nil) == 0 else {
            Glibc.close(readFD)
            Glibc.close(writeFD)
            return nil
        }
        threadKey = key
        var t = pthread_t()
        let arg = Unmanaged.passRetained(self).toOpaque()
        guard pthread_create(&t, nil, serviceMain, arg) == 0 else {
            Unmanaged<HandlerService>.fromOpaque(arg).release()
            return nil
        }
        pthread_detach(t)
    }

    /// In a forked child: closes the parent's service pipe (its thread is not in the child).
    /// Called with the `current` lock held, once per service. A post or flush on this service
    /// afterwards (a parent's handler used in the child) does the work inline as when the pipe
    /// is full, instead of writing to an fd number that may now be someone else's.
    fileprivate func closeInForkedChild() {
        guard pid != getpid(), !closed.exchange(true, ordering: .relaxed) else { return }
        Glibc.close(readFD)
        Glibc.close(writeFD)
    }

    /// Whether the calling thread is a reader or this service (which must not wait for it).
    var callerMustNotWait: Bool { pthread_getspecific(threadKey) != nil }

    /// Marks the calling thread as one that never waits for the service (readers).
    func markNoWait() { _ = pthread_setspecific(threadKey, UnsafeRawPointer(bitPattern: 1)) }

    /// Queues `record` without blocking; false when there is no room (failure reports: half of
    /// the pipe is theirs; the caller drops the report and counts it) or the pipe is full (a
    /// fork: the caller does the work itself). On the fault path: one write(2).
    @inline(__always)
    func post(_ record: inout Record) -> Bool {
        if record.kind == Record.Kind.failure.rawValue && queued.load(ordering: .relaxed) >= failureLimit { return false }
        if closed.load(ordering: .relaxed) { return false }
        let size = MemoryLayout<Record>.size
        queued.add(1, ordering: .relaxed)
        for _ in 0..<3 {
            let n = withUnsafeBytes(of: &record) { write(writeFD, $0.baseAddress, size) }
            if n == size { return true }
            if n < 0 && errno == EINTR { continue }
            break
        }
        queued.subtract(1, ordering: .relaxed)
        return false
    }

    /// Waits until every record posted before this call was handled. No-op on a reader or the
    /// service thread (the work may be waiting for them).
    func flush() {
        if callerMustNotWait || closed.load(ordering: .relaxed) { return }
        let sem = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
        sem_init(sem, 0, 0)
        defer {
            sem_destroy(sem)
            sem.deallocate()
        }
        var r = Record()
        r.kind = Record.Kind.barrier.rawValue
        r.target = UnsafeMutableRawPointer(sem)
        // A full pipe drains: the service never waits for the caller.
        while !post(&r) { usleep(1000) }
        while sem_wait(sem) != 0 && errno == EINTR {}
    }

    fileprivate func run() {
        markNoWait()
        _ = cuffd_set_thread_name("uffd-service")
        var r = Record()
        let size = MemoryLayout<Record>.size
        while true {
            let n = withUnsafeMutableBytes(of: &r) { read(readFD, $0.baseAddress, size) }
            if n < 0 && errno == EINTR { continue }
            // Writes are whole records (atomic, <= PIPE_BUF); anything else: the pipe broke.
            guard n == size else { return }
            queued.subtract(1, ordering: .relaxed)
            switch Record.Kind(rawValue: r.kind) {
            case .barrier:
                sem_post(r.target!.assumingMemoryBound(to: sem_t.self))
            case .fork:
                Unmanaged<Reader>.fromOpaque(r.target!).takeRetainedValue().deliverFork(r.msg)
            case .failure:
                Unmanaged<Reader>.fromOpaque(r.target!).takeRetainedValue().reportFailure(r.msg, r.res, slot: r.slot)
            case nil:
                break
            }
        }
    }
}

private func serviceMain(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<HandlerService>.fromOpaque(arg!).takeRetainedValue().run()
    return nil
}

/// A reader's policy errors on their way to the service: a fixed set of slots, filled by the
/// reader, emptied by the service (under a lock neither holds while allocating).
struct ErrorSlots {
    static let count = 2 * Int(CUFFD_MAX_BATCH)
    var items = [(any Error)?](repeating: nil, count: ErrorSlots.count)
    var next = 0

    /// Stores `e`; the slot, or -1 when the service is that far behind (the error is then
    /// reported without the policy's error value, with its errno).
    mutating func put(_ e: any Error) -> Int32 {
        guard items[next] == nil else { return -1 }
        items[next] = e
        defer { next = (next + 1) % ErrorSlots.count }
        return Int32(next)
    }

    mutating func take(_ slot: Int32) -> (any Error)? {
        guard slot >= 0 else { return nil }
        defer { items[Int(slot)] = nil }
        return items[Int(slot)]
    }
}
