import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Runs the C fault loop (`cuffd_loop_run`) for one userfaultfd on dedicated threads (never on
/// Swift's cooperative pool) and asks a ``FaultPolicy`` how to resolve each fault.
///
/// - Threading: `readers` threads (optionally pinned to CPUs) each run the loop on the same fd;
///   the kernel hands each message to one reader. The policy is called once per fault through a
///   capture-free C trampoline, with no allocation, lock or retain/release on the way.
/// - Stopping: ``stop()`` signals an eventfd; faults already queued are still read and resolved
///   (through the policy, with the fallback on failure) before the threads exit. Later faults
///   stay queued until a handler runs again or the fd is closed. Deferred fetches still in
///   flight are cancelled: their ranges are woken, so their threads re-fault and queue for the
///   next run (or fault normally once the fd is closed); their late deliveries are refused.
/// - Failures: a policy that throws or returns `.fail`, a failing source, a failing ioctl, a
///   deferred fetch that fails or misses ``Options/deferredDeadline`` all get the ``Fallback``
///   (default: poison, so the faulting thread receives SIGBUS) and are reported through
///   ``failures()`` and ``Options/onFailure``; no thread is left blocked.
/// - Deferred resolution: a policy may answer "not yet" (``FaultContext/deferFill(_:length:pageSize:)``
///   and ``Resolution/deferred``) and deliver the bytes later from any thread; see
///   ``DeferredFetch`` and ``DeferredSource``.
/// - Fork: with EVENT_FORK a reader only reads fork events; a service thread (one per process,
///   see `FaultHandlerService.swift`) adopts the child's fd, calls ``FaultPolicy/handle(event:context:)``
///   with `.fork` and starts the child's handler, because fork() holds the malloc locks until
///   its event is read, and a reader that allocates would deadlock with the next fork. The
///   same thread reports failures (``Options/onFailure``). A policy's own work on the reader
///   (resolve, events other than fork, ``FaultPolicy/failed(_:resolution:errno:context:)``)
///   should not allocate either, or a concurrent fork can deadlock with it.
/// - Stats: each reader counts privately; once per batch it publishes its counters and records
///   the batch's latencies under its own, otherwise uncontended, lock; ``stats()`` merges them.
///
/// The pieces: this file is the lifecycle; `FaultHandlerReader.swift` the reader threads and
/// their trampolines; `FaultHandlerRun.swift` the descriptors of one run;
/// `FaultHandlerFailures.swift` failure delivery; `FaultHandlerDeferred.swift` deferral.
public final class FaultHandler: Sendable {
    /// What happens to a fault the policy or the ioctl could not resolve (`enum cuffd_fallback`).
    public enum Fallback: Int32, Sendable, CaseIterable {
        /// Poison the page: the faulting thread gets SIGBUS (zero-fill when POISON was not granted).
        case poison = 0
        /// Map a zero page (MISSING), unprotect (WP) or continue (MINOR): the thread goes on.
        case zeroFill = 1
        /// Only wake: the thread re-faults and the policy is asked again.
        case wake = 2

        /// The C constant this case stands for.
        var cValue: cuffd_fallback {
            switch self {
            case .poison: CUFFD_FALLBACK_POISON
            case .zeroFill: CUFFD_FALLBACK_ZEROPAGE
            case .wake: CUFFD_FALLBACK_WAKE
            }
        }
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
        /// faulting thread's CPU; with a larger value one reader takes a burst of faults from
        /// every CPU while the others sleep (see BENCHMARKS.md).
        public var sharedBatch: Int = 1
        /// What unresolvable faults get.
        public var fallback: Fallback = .poison
        /// Non-blocking reads before each poll() (busy polling for latency); 0: always poll.
        public var spinPolls: UInt32 = 0
        /// What happens to the child's fd on fork events.
        public var forkHandling: ForkHandling = .serveWithSamePolicy
        /// Called for each failure (keep it short; it may allocate), after the faulting thread
        /// was released: on the reader thread, before it reads the next fault; with EVENT_FORK
        /// on the process's handler service thread instead (see ``FaultHandler``'s notes on
        /// fork); on a deferred source's thread for a fetch the source failed.
        public var onFailure: (@Sendable (HandlerFailure) -> Void)? = nil
        /// How many failures ``FaultHandler/failures()`` keeps (the oldest are dropped).
        public var failureLogCapacity: Int = 256
        /// The reader threads' name prefix.
        public var threadName: String = "uffd-reader"
        /// How long ``FaultHandler/start()`` waits for its readers to come up before it gives
        /// up (stops them) and throws.
        public var startTimeout: Duration = .seconds(10)
        /// Ranges that may be fetched at once through ``FaultContext/deferFill(_:length:pageSize:)``
        /// (single flight: faults inside a range in flight join it); 0 disables deferral.
        public var maxDeferredFetches: Int = 1024
        /// How long a deferred fetch may take: then its range gets the fallback, the owner an
        /// ETIMEDOUT failure, and a late delivery is refused (``DeferredOutcome/expired``).
        public var deferredDeadline: Duration = .seconds(10)
        /// Memory whose huge-page coverage ``FaultHandler/stats()`` measures into
        /// ``HandlerStats/hugePageCoverage`` (PAGEMAP_SCAN, off the fault path, on the caller's
        /// thread); nil (the default): not measured. Opt-in because each measurement walks the
        /// page tables of the ranges (~0.6 ms per GiB of 4 KiB pages, see ``HugePageCoverage``):
        /// free for a caller that takes stats now and then, not for one that polls stats() in a
        /// loop. Handlers of forked children do not measure (another address space).
        public var hugePageCoverage: HugePageCoverage.Target? = nil
        /// Runs on each reader thread before it reports ready (tests: a slow start-up).
        var readerStartHook: (@Sendable () -> Void)? = nil

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
    /// EVENT_FORK: a fork waits (holding the malloc locks) for a reader to read its event, so
    /// readers hand allocating work to the service thread. Without it no fork waits for a
    /// reader, and readers report failures themselves, in order with the faults.
    private var forksPossible: Bool { uffd.features.contains(.eventFork) }
    private let state = Mutex(State())
    /// The last huge-page coverage measured and when (cuffd_now_ns): reported once the memory
    /// can no longer be measured (its process exited).
    private let lastCoverage = Mutex<(HugePageCoverage, UInt64)?>(nil)

    private struct State: @unchecked Sendable {
        var run: HandlerRun? = nil
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
    public var isRunning: Bool { state.withLock { $0.run != nil } }

    /// The current run's table of deferred resolutions (nil when stopped or disabled): a
    /// ``Prefetcher`` claims ranges in it so that faults join its fetches.
    var deferredTable: DeferredTable? { state.withLock { $0.run?.deferred } }

    /// Starts the reader threads and returns once every one of them waits for faults (so the
    /// owner may fork right away), or throws. Sets O_NONBLOCK on the fd (the loop needs it). A
    /// handler may be started again after ``stop()``; its stats keep counting across runs.
    /// - Throws: ``UffdError`` `.handler`: the fd is closed, the stop fd, scratch memory or a
    ///   thread cannot be made, or the readers did not come up within ``Options/startTimeout``
    ///   (ETIMEDOUT; they are told to stop and end on their own).
    public func start() throws(UffdError) {
        let result: Result<Void, UffdError> = state.withLock { st in
            if st.run != nil { return .success(()) }
            do throws(UffdError) {
                st.run = try launch()
                return .success(())
            } catch {
                return .failure(error)
            }
        }
        try result.get()
    }

    private func launch() throws(UffdError) -> HandlerRun {
        let userFD = uffd.fd
        guard userFD >= 0 else { throw UffdError(.handler, .badFileDescriptor, detail: "the userfaultfd is closed") }
        let fl = fcntl(userFD, F_GETFL)
        if fl >= 0 && fl & O_NONBLOCK == 0 { _ = fcntl(userFD, F_SETFL, fl | O_NONBLOCK) }
        let files = try ReaderFiles(dupOf: userFD)
        let deferred = options.maxDeferredFetches > 0
            ? try DeferredTable(uffd: files.uffd, options: options, features: uffd.features, sink: sink,
                                   policy: policy) : nil
        let page = basePageSize
        let slot = (policy.scratchBytes + page - 1) / page * page
        let perRead = options.readers > 1 ? options.sharedBatch : options.batch
        var batch = Swift.min(Swift.max(perRead, 1), Int(CUFFD_MAX_BATCH))
        if slot > 0 { batch = Swift.max(1, Swift.min(batch, (64 << 20) / slot)) }
        // Up before any reader: fork events and failure reports go there (see HandlerService).
        let service = forksPossible ? HandlerService.running() : nil
        let ready = ReadySignal()
        var readers: [Reader] = []
        for i in 0..<Swift.max(1, options.readers) {
            var cpu: Int? = nil
            if let cpus = options.cpus, !cpus.isEmpty { cpu = cpus[i % cpus.count] }
            guard let r = Reader(index: i, files: files, ready: ready, deferred: deferred, features: uffd.features,
                                 userModeOnly: uffd.userModeOnly, policy: policy, batch: batch, slot: slot,
                                 cpu: cpu, options: options, sink: sink, service: service) else {
                deferred?.cancel()
                throw UffdError(.handler, .noMemory, detail: "scratch memory")
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
                files.signalStop()
                for t in threads { pthread_join(t, nil) }
                deferred?.cancel()
                throw UffdError(.handler, Errno(rawValue: rc), detail: "pthread_create")
            }
            threads.append(t)
        }
        // Wait until every reader is past its start-up. A thread's first steps may call
        // malloc; glibc's fork() holds the malloc locks while the kernel waits for the
        // handler to read the fork event, so a reader still starting when the owner forks
        // would deadlock with it.
        guard ready.wait(count: readers.count, timeout: options.startTimeout) else {
            // Not started: the readers stop as soon as they run (each holds the files, which
            // close with the last of them).
            files.signalStop()
            for t in threads { pthread_detach(t) }
            deferred?.cancel()
            throw UffdError(.handler, .timedOut,
                            detail: "the reader threads did not start within \(options.startTimeout) (machine overloaded?)")
        }
        return HandlerRun(readers: readers, threads: threads, files: files, deferred: deferred)
    }

    /// Stops the readers after they resolved every fault already queued, and waits for them
    /// (and for handlers serving forked children); then cancels deferred fetches still in
    /// flight (see the type's notes). Idempotent. Called from a policy or an `onFailure`
    /// callback (on a reader thread), it does not wait for that reader, which stops once its
    /// current batch is done; the other readers are waited for.
    public func stop() {
        guard let run = state.withLock({ st in defer { st.run = nil }; return st.run }) else { return }
        run.files.signalStop()
        let me = pthread_self()
        for t in run.threads {
            // A reader calling stop() would wait for itself: it ends on its own instead.
            if pthread_equal(t, me) != 0 { pthread_detach(t) } else { pthread_join(t, nil) }
        }
        run.deferred?.cancel()
        // The readers' last fork events and failure reports are handled (children adopted)
        // before the children are stopped and the stats summed. Not from a reader or the
        // service thread: that work may be waiting for them.
        if forksPossible { HandlerService.running()?.flush() }
        let dropped = sink.droppedReports.exchange(0, ordering: .relaxed)
        if dropped > 0 {
            sink.reportLoop(UffdError(.handler, .noBufferSpace,
                                      detail: "\(dropped) failure reports were dropped: the handler's service thread fell behind (failures() misses them; the stats count them)"))
        }
        var s = HandlerStats()
        for r in run.readers { r.merge(into: &s) }
        run.deferred?.merge(into: &s)
        // Handlers of forked children end with the parent; their counts stay in its stats.
        for child in sink.takeChildren() {
            child.stop()
            s.add(child.stats())
        }
        state.withLock { st in
            if var prev = st.finalStats { prev.add(s); st.finalStats = prev } else { st.finalStats = s }
        }
    }

    /// The counters and latency histogram so far, merged over the readers (and children
    /// serving forked processes).
    public func stats() -> HandlerStats {
        var s = HandlerStats()
        let (run, final) = state.withLock { ($0.run, $0.finalStats) }
        if let final { s.add(final) }
        if let run {
            for r in run.readers { r.merge(into: &s) }
            run.deferred?.merge(into: &s)
        }
        for c in sink.children() { s.add(c.stats()) }
        if let target = options.hugePageCoverage {
            if let c = try? target.measure() {
                lastCoverage.withLock { $0 = (c, cuffd_now_ns()) }
            }
            // A failed measurement (the process is gone) reports the last one, with its time.
            if let (c, at) = lastCoverage.withLock({ $0 }) {
                s.hugePageCoverage = c
                s.hugePageCoverageMeasuredNs = at
            }
        }
        return s
    }

    /// The most recent failures (at most ``Options/failureLogCapacity``).
    /// With EVENT_FORK, failures are reported by the service thread, after the faulting thread
    /// was released: this waits for the reports of faults already resolved (except on a reader
    /// or in an `onFailure` callback).
    public func failures() -> [HandlerFailure] {
        if forksPossible { HandlerService.running()?.flush() }
        return sink.failureLog()
    }

    /// Errors that ended a reader's loop early (poll/read failures), a child handler that could
    /// not start, and (ENOBUFS, at ``stop()``) how many failure reports were dropped because
    /// the service thread fell behind.
    public func loopErrors() -> [UffdError] { sink.loopErrorLog() }
}
