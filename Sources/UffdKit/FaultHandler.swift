import CUffd
import Histogram
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A fault that a policy or an ioctl failed to resolve, delivered to the handler's owner.
public struct HandlerFailure: Sendable, CustomStringConvertible {
    /// The fault.
    public let fault: Fault
    /// What the policy asked for (`.fail` when it threw).
    public let resolution: Resolution
    /// The error the policy threw, if it threw.
    public let policyError: (any Error)?
    /// The errno of the failed operation (EIO for a policy failure).
    public let errno: Errno
    /// Whether the fallback resolved the fault (false: the thread was only woken to re-fault).
    public let recoveredByFallback: Bool

    /// One line: the fault, the operation, the error, and what happened.
    public var description: String {
        var s = "fault at \(hex(fault.address)) (\(fault.kind)): \(resolution.operation) failed"
        if let policyError { s += ": policy threw \(policyError)" } else { s += ": \(errno)" }
        return s + (recoveredByFallback ? "; resolved by the fallback" : "; fallback failed, thread woken to re-fault")
    }
}

/// Runs the C fault loop (`cuffd_loop_run`) for one userfaultfd on dedicated threads (never on
/// Swift's cooperative pool) and asks a ``FaultPolicy`` how to resolve each fault.
///
/// - Threading: `readers` threads (optionally pinned to CPUs) each run the loop on the same fd;
///   the kernel hands each message to one reader. The policy is called once per fault through a
///   capture-free C trampoline, with no allocation, lock or retain/release on the way.
/// - Stopping: ``stop()`` signals an eventfd; faults already queued are still read and resolved
///   (through the policy, with the fallback on failure) before the threads exit. Later faults
///   stay queued until a handler runs again or the fd is closed.
/// - Failures: a policy that throws or returns `.fail`, a failing source, a failing ioctl all get
///   the ``Fallback`` (default: poison, so the faulting thread receives SIGBUS) and are reported
///   through ``failures()`` and ``Options/onFailure``; no thread is left blocked.
/// - Stats: each reader counts privately; once per batch it publishes its counters and records
///   the batch's latencies under its own, otherwise uncontended, lock; ``stats()`` merges them.
public final class FaultHandler: Sendable {
    /// What happens to a fault the policy or the ioctl could not resolve.
    public enum Fallback: Int32, Sendable {
        /// Poison the page: the faulting thread gets SIGBUS (zero-fill when POISON was not granted).
        case poison = 0
        /// Map a zero page (MISSING), unprotect (WP) or continue (MINOR): the thread goes on.
        case zeroFill = 1
        /// Only wake: the thread re-faults and the policy is asked again.
        case wake = 2
    }

    /// What to do with the child's userfaultfd of a fork event.
    public enum ForkHandling: Sendable {
        /// Run a handler with the same options for the child, and the policy's
        /// ``FaultPolicy/forkedChild()`` (the same policy unless it keeps per-address-space state).
        case serveWithSamePolicy
        /// Close it unless the policy kept it: the child's faults then resolve normally
        /// (anonymous memory reads as zeros).
        case release
    }

    /// Handler configuration.
    public struct Options: Sendable {
        /// Reader threads (1 or more).
        public var readers: Int = 1
        /// CPUs to pin readers to (reader i on `cpus[i % cpus.count]`); nil: not pinned.
        public var cpus: [Int]? = nil
        /// Messages read per read() (1...64) by a single reader.
        public var batch: Int = 16
        /// Messages read per read() by each reader when there are several (1...64). Default 1:
        /// each fault then goes to the first free reader, usually the one pinned to the
        /// faulting thread's CPU. With a larger value one reader takes a burst of faults from
        /// every CPU while the others sleep, and waking a thread on another (idle) vCPU costs
        /// tens of µs: 2 faulting threads and 2 readers on 2 CPUs, COPY 4 KiB, measured 10.7 µs
        /// per fault with 16 and 6.8 µs with 1.
        public var sharedBatch: Int = 1
        /// What unresolvable faults get.
        public var fallback: Fallback = .poison
        /// Non-blocking reads before each poll() (busy polling for latency); 0: always poll.
        public var spinPolls: UInt32 = 0
        /// What happens to the child's fd on fork events.
        public var forkHandling: ForkHandling = .serveWithSamePolicy
        /// Called on the reader thread for each failure (keep it short; it may allocate).
        public var onFailure: (@Sendable (HandlerFailure) -> Void)? = nil
        /// How many failures ``FaultHandler/failures()`` keeps (the oldest are dropped).
        public var failureLogCapacity: Int = 256
        /// The reader threads' name prefix.
        public var threadName: String = "uffd-reader"

        /// The defaults: one reader, batch 16, poison fallback, forks served.
        public init() {}
    }

    /// The userfaultfd served.
    public let uffd: Userfaultfd
    /// The policy asked for each fault.
    public let policy: any FaultPolicy
    /// The configuration.
    public let options: Options
    private let sink: HandlerSink
    private let state = Mutex(State())

    private struct State: @unchecked Sendable {
        var readers: [Reader] = []
        var threads: [pthread_t] = []
        var stopFD: Int32 = -1
        var readerFD: Int32 = -1
        var running = false
        var finalStats: HandlerStats? = nil
    }

    /// Creates a handler for `uffd` (not started).
    public init(uffd: Userfaultfd, policy: any FaultPolicy, options: Options = Options()) {
        self.uffd = uffd
        self.policy = policy
        self.options = options
        self.sink = HandlerSink(options: options)
    }

    deinit { stop() }

    /// Whether the reader threads run.
    public var isRunning: Bool { state.withLock { $0.running } }

    /// Starts the reader threads and returns once they wait for faults (so the owner may
    /// fork right away). Sets O_NONBLOCK on the fd (the loop needs it). A handler may be
    /// started again after ``stop()``; its stats keep counting across runs.
    /// - Throws: ``UffdError`` `.handler` when the stop fd, scratch memory or a thread cannot be made.
    public func start() throws(UffdError) {
        let result: Result<Void, UffdError> = state.withLock { st in
            if st.running { return .success(()) }
            let userFD = uffd.fd
            guard userFD >= 0 else { return .failure(UffdError(.handler, .badFileDescriptor, detail: "the userfaultfd is closed")) }
            let fl = fcntl(userFD, F_GETFL)
            if fl >= 0 && fl & O_NONBLOCK == 0 { _ = fcntl(userFD, F_SETFL, fl | O_NONBLOCK) }
            // The readers use their own descriptor of the same file, closed by stop(): a
            // `Userfaultfd.close()` while they run cannot make them read a reused fd number.
            let fd = fcntl(userFD, F_DUPFD_CLOEXEC, 0)
            guard fd >= 0 else { return .failure(UffdError(.handler, Errno(rawValue: errno), detail: "dup of the userfaultfd")) }
            let efd = cuffd_eventfd()
            guard efd >= 0 else {
                Glibc.close(fd)
                return .failure(UffdError(.handler, rc: efd, detail: "eventfd"))
            }
            let page = basePageSize
            let slot = (policy.scratchBytes + page - 1) / page * page
            let perRead = options.readers > 1 ? options.sharedBatch : options.batch
            var batch = Swift.min(Swift.max(perRead, 1), Int(CUFFD_MAX_BATCH))
            if slot > 0 { batch = Swift.max(1, Swift.min(batch, (64 << 20) / slot)) }
            sink.ready.store(0, ordering: .relaxed)
            var readers: [Reader] = []
            for i in 0..<Swift.max(1, options.readers) {
                var cpu: Int? = nil
                if let cpus = options.cpus, !cpus.isEmpty { cpu = cpus[i % cpus.count] }
                guard let r = Reader(index: i, fd: fd, stopFD: efd, features: uffd.features, userModeOnly: uffd.userModeOnly, policy: policy,
                                     batch: batch, slot: slot, cpu: cpu, options: options, sink: sink) else {
                    Glibc.close(efd)
                    Glibc.close(fd)
                    return .failure(UffdError(.handler, .noMemory, detail: "scratch memory"))
                }
                readers.append(r)
            }
            var threads: [pthread_t] = []
            for r in readers {
                var t = pthread_t()
                let arg = Unmanaged.passRetained(r).toOpaque()
                let rc = pthread_create(&t, nil, readerMain, arg)
                if rc != 0 {
                    Unmanaged<Reader>.fromOpaque(arg).release()
                    _ = cuffd_eventfd_signal(efd)
                    for t in threads { pthread_join(t, nil) }
                    Glibc.close(efd)
                    Glibc.close(fd)
                    return .failure(UffdError(.handler, Errno(rawValue: rc), detail: "pthread_create"))
                }
                threads.append(t)
            }
            // Wait until every reader is past its start-up. A thread's first steps may call
            // malloc; glibc's fork() holds the malloc locks while the kernel waits for the
            // handler to read the fork event, so a reader still starting when the owner forks
            // would deadlock with it.
            var waited = 0
            while sink.ready.load(ordering: .acquiring) < readers.count && waited < 10_000 {
                usleep(1000)
                waited += 1
            }
            st.readers = readers
            st.threads = threads
            st.stopFD = efd
            st.readerFD = fd
            st.running = true
            return .success(())
        }
        try result.get()
    }

    /// Stops the readers after they resolved every fault already queued, and waits for them
    /// (and for handlers serving forked children). Idempotent. Called from a policy or an
    /// `onFailure` callback (on a reader thread), it does not wait for that reader, which stops
    /// once its current batch is done; the other readers are waited for.
    public func stop() {
        let (threads, efd, rfd, readers): ([pthread_t], Int32, Int32, [Reader]) = state.withLock { st in
            guard st.running else { return ([], -1, -1, []) }
            st.running = false
            let r = (st.threads, st.stopFD, st.readerFD, st.readers)
            st.threads = []
            st.stopFD = -1
            st.readerFD = -1
            return r
        }
        guard efd >= 0 else { return }
        _ = cuffd_eventfd_signal(efd)
        // A reader calling stop() would wait for itself: detach it instead, and let it close
        // the stop fd and the readers' descriptor when its loop returns (it still uses them).
        let me = pthread_self()
        var selfReader: Reader? = nil
        for (t, r) in zip(threads, readers) {
            if pthread_equal(t, me) != 0 {
                pthread_detach(t)
                selfReader = r
            } else {
                pthread_join(t, nil)
            }
        }
        if let selfReader {
            selfReader.closeFDsOnExit.store(rfd, ordering: .releasing)
        } else {
            Glibc.close(efd)
            // The readers' descriptor: after a Userfaultfd.close(), this drops the last
            // reference and releases every thread still blocked.
            if rfd >= 0 { Glibc.close(rfd) }
        }
        var s = HandlerStats()
        for r in readers { r.merge(into: &s) }
        // Handlers of forked children end with the parent; their counts stay in its stats.
        for child in sink.takeChildren() {
            child.stop()
            s.add(child.stats())
        }
        state.withLock { st in
            if var prev = st.finalStats { prev.add(s); st.finalStats = prev } else { st.finalStats = s }
            st.readers = []
        }
    }

    /// The counters and latency histogram so far, merged over the readers (and children
    /// serving forked processes).
    public func stats() -> HandlerStats {
        var s = HandlerStats()
        let (readers, final) = state.withLock { ($0.readers, $0.finalStats) }
        if let final { s.add(final) }
        for r in readers { r.merge(into: &s) }
        for c in sink.children() { s.add(c.stats()) }
        return s
    }

    /// The most recent failures (at most ``Options/failureLogCapacity``).
    public func failures() -> [HandlerFailure] { sink.failureLog() }

    /// Errors that ended a reader's loop early (poll/read failures), if any.
    public func loopErrors() -> [UffdError] { sink.loopErrorLog() }
}

/// Where readers report failures and forked children; shared by the handler and its readers.
final class HandlerSink: Sendable {
    let options: FaultHandler.Options
    /// Readers that reached their loop (start() waits for all of them).
    let ready = Atomic<Int>(0)
    private let log = Mutex<[HandlerFailure]>([])
    private let loopErrs = Mutex<[UffdError]>([])
    private let kids = Mutex<[FaultHandler]>([])

    init(options: FaultHandler.Options) { self.options = options }

    func report(_ f: HandlerFailure) {
        log.withLock { l in
            if l.count >= options.failureLogCapacity, !l.isEmpty { l.removeFirst() }
            if options.failureLogCapacity > 0 { l.append(f) }
        }
        options.onFailure?(f)
    }

    func reportLoop(_ e: UffdError) { loopErrs.withLock { $0.append(e) } }
    func failureLog() -> [HandlerFailure] { log.withLock { $0 } }
    func loopErrorLog() -> [UffdError] { loopErrs.withLock { $0 } }

    func adopt(child: Userfaultfd, policy: any FaultPolicy) {
        guard case .serveWithSamePolicy = options.forkHandling else { return }
        let h = FaultHandler(uffd: child, policy: policy.forkedChild(), options: options)
        do {
            try h.start()
            kids.withLock { $0.append(h) }
        } catch {
            reportLoop(error)
        }
    }

    func children() -> [FaultHandler] { kids.withLock { $0 } }
    func takeChildren() -> [FaultHandler] { kids.withLock { k in defer { k = [] }; return k } }
}

/// The thread entry: takes over the retain done by `start()`.
private func readerMain(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let r = Unmanaged<Reader>.fromOpaque(arg!).takeRetainedValue()
    r.run()
    return nil
}

let decideTrampoline: cuffd_decide_fn = { ctx, msgs, res, n in
    Unmanaged<Reader>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.decide(msgs!, res!, Int(n)) }
}

let completeTrampoline: cuffd_complete_fn = { ctx, msgs, res, n in
    Unmanaged<Reader>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.complete(msgs!, res!, Int(n)) }
}

/// One reader thread's state. Everything mutable is touched only by that thread, except
/// `published`, which `stats()` reads under its lock.
final class Reader: @unchecked Sendable {
    struct Published {
        var loop = cuffd_loop_stats()
        var latency = HandlerStats.makeHistogram()
    }

    let index: Int
    let fd: Int32
    let stopFD: Int32
    /// Set by stop() called on this reader's own thread: the readers' descriptor (or -1 when
    /// none) that this reader closes, with the stop fd, when its loop ends. -2: not set.
    let closeFDsOnExit = Atomic<Int32>(-2)
    let features: Features
    /// The fd's UFFD_USER_MODE_ONLY (a forked child's fd inherits it).
    let userModeOnly: Bool
    let policy: any FaultPolicy
    let batch: Int
    let cpu: Int?
    let fallback: Int32
    let spinPolls: UInt32
    let name: String
    let sink: HandlerSink
    let pageMask: UInt
    let basePage: Int
    let exact: Bool
    let threadIDs: Bool
    let context: FaultContext
    let scratch: UnsafeMutableRawPointer?
    let scratchLength: Int
    let loopStats: UnsafeMutablePointer<cuffd_loop_stats>
    let published = Mutex(Published())
    /// Errors thrown by the policy in the current batch (index in the batch, error).
    var pendingErrors: [(Int, any Error)] = []

    init?(index: Int, fd: Int32, stopFD: Int32, features: Features, userModeOnly: Bool, policy: any FaultPolicy,
          batch: Int, slot: Int, cpu: Int?, options: FaultHandler.Options, sink: HandlerSink) {
        self.index = index
        self.fd = fd
        self.stopFD = stopFD
        self.features = features
        self.userModeOnly = userModeOnly
        self.policy = policy
        self.batch = batch
        self.cpu = cpu
        self.fallback = options.fallback.rawValue
        self.spinPolls = options.spinPolls
        self.name = "\(options.threadName)-\(index)"
        self.sink = sink
        self.basePage = basePageSize
        self.pageMask = ~(UInt(basePage) - 1)
        self.exact = features.contains(.exactAddress)
        self.threadIDs = features.contains(.threadID)
        // Room for one full read plus the loop's deferred retries.
        let slots = 2 * Int(CUFFD_MAX_BATCH)
        if slot > 0 {
            let len = slot * slots
            let p = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard let p, p != MAP_FAILED else { return nil }
            scratch = p
            scratchLength = len
        } else {
            scratch = nil
            scratchLength = 0
        }
        context = FaultContext(fd: fd, features: features, reader: index, scratchBase: scratch, slotSize: slot)
        loopStats = .allocate(capacity: 1)
        loopStats.initialize(to: cuffd_loop_stats())
        pendingErrors.reserveCapacity(Int(CUFFD_MAX_BATCH) * 2)
    }

    deinit {
        if let scratch { munmap(scratch, scratchLength) }
        loopStats.deallocate()
    }

    func run() {
        if let cpu { _ = cuffd_pin_self(Int32(cpu)) }
        _ = cuffd_set_thread_name(name)
        var cfg = cuffd_loop_config()
        cfg.uffd = fd
        cfg.stop_fd = stopFD
        cfg.batch = UInt32(batch)
        cfg.fallback = fallback
        cfg.features = features.rawValue
        cfg.spin_polls = spinPolls
        cfg.decide = decideTrampoline
        cfg.complete = completeTrampoline
        cfg.ctx = Unmanaged.passUnretained(self).toOpaque()
        // Tell start() this thread is past its start-up (which may allocate): see start().
        sink.ready.add(1, ordering: .releasing)
        let rc = cuffd_loop_run(&cfg, loopStats)
        if rc < 0 { sink.reportLoop(UffdError(.faultLoop, rc: rc, detail: name)) }
        published.withLock { $0.loop = loopStats.pointee }
        let rfd = closeFDsOnExit.load(ordering: .acquiring)
        if rfd != -2 {
            Glibc.close(stopFD)
            if rfd >= 0 { Glibc.close(rfd) }
        }
    }

    /// Fills `res[i]` for each fault of the batch; events go to the policy in order.
    @inline(__always)
    func decide(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafeMutablePointer<cuffd_resolution>, _ n: Int) {
        var ctx = context
        for i in 0..<n {
            if msgs[i].event == UInt8(UFFD_EVENT_PAGEFAULT) {
                let fault = Fault(msgs[i], pageMask: pageMask, exact: exact, threadIDs: threadIDs)
                ctx.batchIndex = i
                do {
                    let r = try policy.resolve(fault, context: ctx)
                    res[i].op = r.operation.rawValue
                    if r.length == 0 {
                        res[i].dst = UInt64(fault.address)
                        res[i].len = UInt64(basePage)
                    } else {
                        res[i].dst = UInt64(r.start)
                        res[i].len = UInt64(r.length)
                    }
                    res[i].src = UInt64(r.source)
                    res[i].mode = r.mode
                } catch {
                    res[i].op = Resolution.Operation.fail.rawValue
                    pendingErrors.append((i, error))
                }
            } else {
                deliver(msgs[i], ctx)
            }
        }
    }

    /// Events are rare: decoding one may allocate (a fork's child fd becomes a `Userfaultfd`).
    @inline(never)
    func deliver(_ m: uffd_msg, _ ctx: FaultContext) {
        let event = Event(m, features: features, userModeOnly: userModeOnly)
        policy.handle(event: event, context: ctx)
        if case .fork(let child) = event { sink.adopt(child: child, policy: policy) }
    }

    /// Publishes counters and latencies of the batch; reports failures.
    @inline(__always)
    func complete(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafePointer<cuffd_resolution>, _ n: Int) {
        var failed = false
        published.withLock { p in
            p.loop = loopStats.pointee
            for i in 0..<n where res[i].op != 0 && res[i].outcome != 0 {
                _ = p.latency.record(res[i].end_ns &- res[i].start_ns)
                let o = res[i].outcome
                if o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) { failed = true }
            }
        }
        // A policy error always ends as FALLBACK or FAILED (op .fail makes the loop apply the
        // fallback), so `failed` covers pendingErrors too; reading pendingErrors here (a class
        // var) would cost a dynamic exclusivity check per batch.
        if failed { reportFailures(msgs, res, n) }
    }

    @inline(never)
    func reportFailures(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafePointer<cuffd_resolution>, _ n: Int) {
        for i in 0..<n {
            let o = res[i].outcome
            guard o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) else { continue }
            let policyError = pendingErrors.first(where: { $0.0 == i })?.1
            let r = res[i]
            let fault = Fault(msgs[i], pageMask: pageMask, exact: exact, threadIDs: threadIDs)
            let resolution = Resolution(Resolution.Operation(rawValue: r.op) ?? .fail, start: UInt(r.dst),
                                        length: Int(r.len), source: UInt(r.src), mode: r.mode)
            var ctx = context
            ctx.batchIndex = i
            policy.failed(fault, resolution: resolution, errno: Errno(rawValue: r.error), context: ctx)
            sink.report(HandlerFailure(fault: fault, resolution: resolution, policyError: policyError,
                                       errno: Errno(rawValue: r.error),
                                       recoveredByFallback: o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue)))
        }
        pendingErrors.removeAll(keepingCapacity: true)
    }

    func merge(into s: inout HandlerStats) {
        published.withLock { p in
            s.add(p.loop)
            s.latency.add(p.latency)
        }
    }
}
