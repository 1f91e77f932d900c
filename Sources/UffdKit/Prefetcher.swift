import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Installs the pages of a recorded ``WorkingSet`` ahead of the faults, on a dedicated thread
/// (a pthread, never Swift's cooperative pool), while a ``FaultHandler`` keeps serving faults.
///
/// - Order and batches: pages in recorded order; pages adjacent in both order and image form a
///   run installed by one UFFDIO_COPY with DONTWAKE; runs are grouped into batches of at most
///   ``Options/batchBytes`` and each batch ends with one UFFDIO_WAKE over its span, waking any
///   thread that faulted on a page the batch installed.
/// - Faults first: before each batch the filler polls the userfaultfd; while faults are queued
///   (unread) it gives the CPU away, for at most ``Options/maxWaitForFaults`` (so a stopped
///   handler cannot stall it for good). A batch is short (256 KiB by default), so a fault never
///   waits behind more than one batch, and the filler never holds a lock a reader needs.
/// - Ahead of the process: with the handler's tracker shared (``WorkingSetPolicy``), pages a
///   fault already took are passed over without a source read or an ioctl, and when the faults
///   are further down the list than the filler (it fell behind), it jumps to just past them and
///   comes back for the pages it jumped over once the rest of the list is done.
/// - Races: a page a fault resolved first stops the filler's COPY with EEXIST; that page is
///   counted (``Stats/alreadyPresentPages``) and the copy goes on after it. A fault queued on a
///   page the filler installed meanwhile gets EEXIST in the handler, which wakes it.
/// - Ending: the list is done (``Ending/finished``), ``stop()`` (``Ending/stopped``), the
///   `stopWhen` condition (the handler stopped: ``Ending/handlerStopped``), or the process whose
///   memory this is went away (ESRCH: ``Ending/processGone``). A range that was unmapped
///   (ENOENT, or no longer in the ``ServedRange``) and a source that fails for a page skip
///   those pages: the fault path serves them if they are touched, with its own error handling.
///   No faulting thread ever waits on the filler.
/// - Remote and packed sources (a ``DeferredSource``, started with ``start(alongside:)``): the
///   filler does not read; it claims each recorded chunk in the handler's table of deferred
///   resolutions (``Options/deferredFetches`` in flight, in recorded order, yielding to queued
///   faults before each claim and leaving half the table to faults) and the source's thread
///   installs the chunk when it arrives, waking the faults that joined the claim (a fault on a
///   claimed chunk waits for that fetch instead of starting its own). A fetch that fails, is
///   older than the handler's ``FaultHandler/Options/deferredDeadline``, or is still out when
///   the filler stops is dropped: its range is woken, never given the fallback, and a joined
///   fault re-faults to be served (or given the fallback) as any fault.
public final class Prefetcher: @unchecked Sendable {
    /// Filler configuration.
    public struct Options: Sendable {
        /// The largest batch (and ioctl), in bytes; at least one page.
        public var batchBytes: Int = 256 << 10
        /// How long the filler yields to queued faults before doing one batch anyway (seconds).
        public var maxWaitForFaults: Double = 0.002
        /// A nice value for the filler thread (e.g. 19), nil: the caller's.
        public var niceness: Int32? = nil
        /// A CPU to pin the filler to, nil: not pinned.
        public var cpu: Int? = nil
        /// The thread's name.
        public var threadName: String = "uffd-prefetch"
        /// For a ``ChunkedSource`` (remote or packed): chunks of the list requested ahead of the
        /// filler (`ChunkedSource.prefetch(chunk:)`: into its cache, joining fetches in flight,
        /// the source's own connection limit bounding the concurrency). 0: none.
        public var chunksAhead: Int = 16
        /// For a ``DeferredSource`` started with ``Prefetcher/start(alongside:)``: chunks of the
        /// list fetched at once through the handler's table of deferred resolutions (a fault on
        /// a chunk being prefetched joins that fetch instead of starting its own). 0: the
        /// synchronous filler (`bytes(at:count:scratch:)` on the filler thread).
        public var deferredFetches: Int = 16

        /// The defaults: 256 KiB batches, 2 ms of yielding to faults at most, not pinned.
        public init() {}
    }

    /// Why the filler ended.
    public enum Ending: Sendable, Hashable, CustomStringConvertible {
        /// Every recorded page was installed or found present (or skipped, see the stats).
        case finished
        /// ``stop()`` was called.
        case stopped
        /// The `stopWhen` condition held (the handler stopped).
        case handlerStopped
        /// The memory's process went away (ESRCH).
        case processGone

        /// A word for logs and JSON.
        public var description: String {
            switch self {
            case .finished: "finished"
            case .stopped: "stopped"
            case .handlerStopped: "handler-stopped"
            case .processGone: "process-gone"
            }
        }
    }

    /// What the filler did.
    public struct Stats: Sendable, Hashable {
        /// Pages in the working set (in this memory's page size).
        public var plannedPages = 0
        /// The memory's page size.
        public var pageSize = 0
        /// Recorded pages the filler installed (through the deferred path a chunk's other
        /// pages come with it: ``extraPages``).
        public var prefetchedPages = 0
        /// Pages a fault took first: already present when the filler got there (EEXIST), or
        /// seen faulting by the shared tracker and passed over without an ioctl. Normal.
        public var alreadyPresentPages = 0
        /// Pages skipped: unmapped since, a source error, or a failed ioctl.
        public var skippedPages = 0
        /// Faults on pages the filler installed (queued before it got there, or noted while its
        /// copy was in flight; each such fault's own copy meets EEXIST). nil when the tracker is
        /// not shared with the handler's ``WorkingSetPolicy``.
        public var faultsOnPrefetchedPages: Int? = nil
        /// Prefetched pages that never faulted (and were used, when the used pages are known):
        /// faults the prefetch saved. nil without a shared tracker.
        public var faultsAvoided: Int? = nil
        /// Prefetched pages the process used; nil unless the owner knows which pages were used
        /// (reads of a present page do not reach a userfaultfd handler).
        public var usedPages: Int? = nil
        /// Bytes prefetched and never used; nil when the used pages are not known.
        public var wastedBytes: Int? = nil
        /// Batches done, UFFDIO_COPY calls, UFFDIO_WAKE calls.
        public var batches = 0, copies = 0, wakes = 0
        /// Batches that first yielded to queued faults.
        public var yieldedToFaults = 0
        /// Runs the filler jumped over because the faults were already past them in the list
        /// (done after the rest of the list; their pages mostly faulted meanwhile).
        public var runsSkippedAhead = 0
        /// EAGAIN retries (the address space was changing).
        public var retries = 0
        /// Source reads that failed, and the last error (pages skipped).
        public var sourceErrors = 0
        /// The last error, if any.
        public var lastError: String? = nil
        /// Through the handler's deferred table: chunks the filler fetched, faults that joined
        /// one of those fetches, chunks a fault's own fetch already had (left to it), and
        /// fetches dropped (source failure, deadline, stop: their range is woken, never given
        /// the fallback; joined faults re-fault and are served as any fault).
        public var deferredChunks = 0, faultsJoined = 0, chunksTakenByFaults = 0, droppedFetches = 0
        /// Through the handler's deferred table: pages outside the recording installed with
        /// their chunk (the source's unit, as a fault's fetch would); unused ones are wasted.
        public var extraPages = 0
        /// Seconds from the filler's start to the last recorded page present (nil unless finished).
        public var timeToLastPage: Double? = nil
        /// Seconds the filler ran so far.
        public var seconds = 0.0
        /// Why it ended; nil while running or never started.
        public var ending: Ending? = nil

        /// Prefetched bytes.
        public var prefetchedBytes: Int { prefetchedPages * pageSize }
    }

    /// The userfaultfd the pages are installed through.
    public let uffd: Userfaultfd
    /// The memory filled (logical offsets, follows remaps).
    public let range: ServedRange
    /// Where the bytes come from.
    public let source: any PageSource
    /// The recording.
    public let workingSet: WorkingSet
    /// Page states shared with the fault path (or the filler's own).
    public let tracker: WorkingSetTracker
    /// The configuration.
    public let options: Options

    private let shared: Bool
    private let runs: [(offset: Int, length: Int)]
    /// For a ChunkedSource: its chunks in list order (each once), and per run the position in
    /// that list of the run's first chunk.
    private let chunkOrder: [Int]
    private let runChunkPosition: [Int]
    /// The list position of each run's first page (ascending).
    private let runRanks: [Int]
    /// Whether the handler's faults report how far down the list they are (shared tracker).
    private let followsFaults: Bool
    private let planned: Int
    /// For a DeferredSource: its chunks in list order (each once, clipped to the source and the
    /// range) and, per chunk, its recorded pages (`chunkPages[pageSpan]`).
    private let deferredChunks: [(offset: Int, length: Int, pageSpan: Range<Int>)]
    /// The source as a DeferredSource: itself, or the deferred view of a serve region's
    /// ``ImageWindow`` over a deferred image (what the region's ``DeferredCopyPolicy`` fetches).
    private let deferredSource: (any DeferredSource)?
    private let chunkPages: [Int]
    private let state = Mutex<State>(State())
    private let stopRequested = Atomic<Bool>(false)
    private let counters = Counters()

    private struct State: @unchecked Sendable {
        var thread: pthread_t? = nil
        var started = false
        var ending: Ending? = nil
        var startNs: UInt64 = 0
        var endNs: UInt64 = 0
        var lastError: String? = nil
    }

    final class Counters: Sendable {
        let prefetched = Atomic<Int>(0), existed = Atomic<Int>(0), skipped = Atomic<Int>(0)
        let batches = Atomic<Int>(0), copies = Atomic<Int>(0), wakes = Atomic<Int>(0)
        let yielded = Atomic<Int>(0), retries = Atomic<Int>(0), sourceErrors = Atomic<Int>(0)
        let skippedAhead = Atomic<Int>(0)
        let deferredChunks = Atomic<Int>(0), faultsJoined = Atomic<Int>(0), takenByFaults = Atomic<Int>(0)
        let dropped = Atomic<Int>(0), extra = Atomic<Int>(0)
    }

    /// Prepares a filler of `range` from `source` with the pages of `workingSet`.
    ///
    /// Checks, before anything is installed, that the recording was made from this image
    /// (size and sampled digest, see ``WorkingSet/Identity``) and that every page lies inside
    /// the range: a stale or foreign recording is an error here, never wrong memory.
    /// Pass the `tracker` of the handler's ``WorkingSetPolicy`` to learn which faults the
    /// prefetch saved; without one the filler keeps its own page table.
    /// - Throws: ``UffdError`` `.argument` for a mismatched recording, the source's error when
    ///   the image cannot be sampled, `.map` when the page table cannot be mapped.
    ///
    /// A region of a larger image (one of a VM's memory regions in its memory file): `source`
    /// serves the region (its offset 0 is `imageOffset` in the image), `imageIdentity` is the
    /// whole image's (``WorkingSet/Identity/init(of:)`` of the image, checked once), and only
    /// the recorded pages inside the region are installed.
    public init(uffd: Userfaultfd, range: ServedRange, source: any PageSource, workingSet: WorkingSet,
                tracker: WorkingSetTracker? = nil, imageOffset: Int = 0, imageIdentity: WorkingSet.Identity? = nil,
                options: Options = Options()) throws {
        if imageOffset != 0 && imageIdentity == nil {
            throw UffdError(.argument, .invalidArgument, detail: "a region at image offset \(imageOffset) needs the whole image's identity")
        }
        let identity = try imageIdentity ?? WorkingSet.Identity(of: source)
        try workingSet.check(against: identity, servedLength: imageIdentity == nil ? range.length : identity.size)
        if let tracker, tracker.imageOffset != imageOffset {
            throw UffdError(.argument, .invalidArgument, detail: "the tracker's image offset \(tracker.imageOffset) is not the prefetcher's \(imageOffset)")
        }
        if let tracker, tracker.range !== range {
            throw UffdError(.argument, .invalidArgument, detail: "the tracker must track the prefetcher's range")
        }
        self.uffd = uffd
        self.range = range
        self.source = source
        self.workingSet = workingSet
        self.shared = tracker != nil
        self.tracker = try tracker ?? WorkingSetTracker(range: range, recording: false, imageOffset: imageOffset)
        var o = options
        let ps = range.pageSize
        o.batchBytes = Swift.max(ps, o.batchBytes / ps * ps)
        self.options = o
        let offsets = workingSet.offsets(forPageSize: ps)
            .filter { $0 >= imageOffset && $0 - imageOffset < range.length }.map { $0 - imageOffset }
        planned = offsets.count
        var runs: [(offset: Int, length: Int)] = []
        var ranks: [Int] = []
        for (rank, off) in offsets.enumerated() {
            if let last = runs.last, last.offset + last.length == off, last.length + ps <= o.batchBytes {
                runs[runs.count - 1].length += ps
            } else {
                runs.append((off, ps))
                ranks.append(rank)
            }
        }
        self.runs = runs
        self.runRanks = ranks
        var order: [Int] = [], positions: [Int] = []
        if let chunked = source as? ChunkedSource, o.chunksAhead > 0, chunked.chunkSize > 0 {
            var seen = Set<Int>()
            for r in runs {
                for c in (r.offset / chunked.chunkSize)...((r.offset + r.length - 1) / chunked.chunkSize)
                where seen.insert(c).inserted { order.append(c) }
                positions.append(order.count - 1)
            }
        }
        self.chunkOrder = order
        var dchunks: [(offset: Int, length: Int, pageSpan: Range<Int>)] = []
        var dpages: [Int] = []
        var deferred = source as? any DeferredSource
        if deferred == nil, let w = source as? ImageWindow, let image = w.image as? any DeferredSource,
           DeferredImageWindow.usable(image: image, offset: w.offset, pageSize: ps) {
            deferred = DeferredImageWindow(image: image, offset: w.offset, length: w.length)
        }
        deferredSource = deferred
        if let ds = deferred, ds.chunkSize > 0, ds.chunkSize % ps == 0 {
            let cs = ds.chunkSize
            let limit = Swift.min(range.length, (ds.length + ps - 1) / ps * ps)
            var byChunk: [Int: [Int]] = [:]
            var firsts: [Int] = []
            for off in offsets where off < limit {
                let c = off / cs
                if byChunk[c] == nil { firsts.append(c) }
                byChunk[c, default: []].append(off / ps)
            }
            for c in firsts {
                let pages = byChunk[c]!
                dchunks.append((c * cs, Swift.min(cs, limit - c * cs), dpages.count..<(dpages.count + pages.count)))
                dpages += pages
            }
        }
        self.deferredChunks = dchunks
        self.chunkPages = dpages
        self.runChunkPosition = positions
        followsFaults = tracker?.publishRanks(offsets.map { $0 / ps }) ?? false
    }

    deinit { stop() }

    /// Starts the filler thread; it ends by itself when the list is done. `stopWhen` is asked
    /// between batches (e.g. whether the handler still runs).
    /// - Throws: ``UffdError`` `.handler` when the thread or its descriptor cannot be made.
    public func start(stopWhen: (@Sendable () -> Bool)? = nil) throws(UffdError) {
        try start(stopWhen: stopWhen, table: nil, keepFree: 0)
    }

    private func start(stopWhen: (@Sendable () -> Bool)?, table: DeferredTable?, keepFree: Int) throws(UffdError) {
        let result: Result<Void, UffdError> = state.withLock { st in
            guard !st.started else { return .success(()) }
            let userFD = uffd.fd
            guard userFD >= 0 else { return .failure(UffdError(.handler, .badFileDescriptor, detail: "the userfaultfd is closed")) }
            // Its own descriptor: a Userfaultfd.close() while the filler runs cannot make it
            // use a reused fd number.
            let fd = fcntl(userFD, F_DUPFD_CLOEXEC, 0)
            guard fd >= 0 else { return .failure(UffdError(.handler, Errno(rawValue: errno), detail: "dup of the userfaultfd")) }
            let job = Filler(owner: self, fd: fd, stopWhen: stopWhen, table: table, keepFree: keepFree)
            st.startNs = monotonicNanoseconds()
            var t = pthread_t()
            let arg = Unmanaged.passRetained(job).toOpaque()
            let rc = pthread_create(&t, nil, fillerMain, arg)
            guard rc == 0 else {
                Unmanaged<Filler>.fromOpaque(arg).release()
                close(fd)
                return .failure(UffdError(.handler, Errno(rawValue: rc), detail: "pthread_create (prefetch filler)"))
            }
            st.thread = t
            st.started = true
            return .success(())
        }
        try result.get()
    }

    /// Starts the filler alongside `handler`: it ends when the handler stops. A
    /// ``DeferredSource`` (e.g. a remote or packed ``ChunkedSource``) served by the handler's
    /// ``DeferredCopyPolicy`` is prefetched through the handler's table of deferred resolutions
    /// (``Options/deferredFetches`` chunks in flight, in recorded order, never taking more than
    /// half the table from the faults): a fault on a chunk being prefetched joins that fetch.
    public func start(alongside handler: FaultHandler) throws(UffdError) {
        let table = options.deferredFetches > 0 && !deferredChunks.isEmpty ? handler.deferredTable : nil
        try start(stopWhen: { [weak handler] in !(handler?.isRunning ?? false) }, table: table,
                  keepFree: handler.options.maxDeferredFetches / 2)
    }

    /// Stops the filler after its current ioctl and waits for it. Idempotent.
    public func stop() {
        stopRequested.store(true, ordering: .relaxed)
        let t: pthread_t? = state.withLock { st in defer { st.thread = nil }; return st.thread }
        guard let t else { return }
        // The filler may drop the last reference itself (deinit then runs on it).
        if pthread_equal(t, pthread_self()) != 0 { pthread_detach(t) } else { pthread_join(t, nil) }
    }

    /// Waits until the filler ended (or `timeout` seconds passed); returns whether it ended.
    public func wait(timeout: Double) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(Swift.max(0, timeout) * 1e9)
        while state.withLock({ $0.started && $0.ending == nil }) {
            if monotonicNanoseconds() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    /// Why the filler ended (nil while it runs).
    public var ending: Ending? { state.withLock { $0.ending } }

    /// What the filler did so far. `used` says whether the process used logical page `index`
    /// (when the owner knows it, e.g. the workload's pages); with it ``Stats/usedPages`` and
    /// ``Stats/wastedBytes`` are filled in.
    public func stats(used: ((Int) -> Bool)? = nil) -> Stats {
        var s = Stats()
        let st = state.withLock { $0 }
        s.plannedPages = planned
        s.pageSize = range.pageSize
        s.prefetchedPages = counters.prefetched.load(ordering: .relaxed)
        s.alreadyPresentPages = counters.existed.load(ordering: .relaxed)
        s.skippedPages = counters.skipped.load(ordering: .relaxed)
        s.batches = counters.batches.load(ordering: .relaxed)
        s.copies = counters.copies.load(ordering: .relaxed)
        s.wakes = counters.wakes.load(ordering: .relaxed)
        s.yieldedToFaults = counters.yielded.load(ordering: .relaxed)
        s.retries = counters.retries.load(ordering: .relaxed)
        s.runsSkippedAhead = counters.skippedAhead.load(ordering: .relaxed)
        s.sourceErrors = counters.sourceErrors.load(ordering: .relaxed)
        s.deferredChunks = counters.deferredChunks.load(ordering: .relaxed)
        s.faultsJoined = counters.faultsJoined.load(ordering: .relaxed)
        s.chunksTakenByFaults = counters.takenByFaults.load(ordering: .relaxed)
        s.droppedFetches = counters.dropped.load(ordering: .relaxed)
        s.extraPages = counters.extra.load(ordering: .relaxed)
        s.lastError = st.lastError
        s.ending = st.ending
        let end = st.endNs != 0 ? st.endNs : monotonicNanoseconds()
        s.seconds = st.startNs == 0 ? 0 : Double(end - st.startNs) / 1e9
        if st.ending == .finished { s.timeToLastPage = s.seconds }
        var avoided = 0, usedCount = 0, wasted = 0
        for i in 0..<tracker.pages where tracker.prefetched(page: i) {
            let u = used?(i) ?? true
            if u { usedCount += 1 } else { wasted += 1 }
            if u && !tracker.faulted(page: i) { avoided += 1 }
        }
        if shared {
            s.faultsOnPrefetchedPages = tracker.faultsOnPrefetchedPages
            s.faultsAvoided = avoided
        }
        if used != nil {
            s.usedPages = usedCount
            s.wastedBytes = wasted * range.pageSize
        }
        return s
    }

    // MARK: The filler thread

    final class Filler: @unchecked Sendable {
        /// Strong: the prefetcher lives until its filler ended.
        let owner: Prefetcher
        let fd: Int32
        let stopWhen: (@Sendable () -> Bool)?
        /// The handler's deferred table, when the source is prefetched through it.
        let table: DeferredTable?
        let keepFree: Int
        init(owner: Prefetcher, fd: Int32, stopWhen: (@Sendable () -> Bool)?, table: DeferredTable?, keepFree: Int) {
            self.owner = owner
            self.fd = fd
            self.stopWhen = stopWhen
            self.table = table
            self.keepFree = keepFree
        }
    }

    fileprivate func fill(_ job: Filler) {
        if let cpu = options.cpu { _ = cuffd_pin_self(Int32(cpu)) }
        _ = cuffd_set_thread_name(options.threadName)
        // On Linux, who = 0 with PRIO_PROCESS is the calling thread only.
        if let nice = options.niceness { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, nice) }
        let ps = range.pageSize
        let scratchBytes = options.batchBytes
        let scratch = mmap(nil, scratchBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        var ending = Ending.finished
        var lastError: String? = nil
        defer {
            if let scratch, scratch != MAP_FAILED { munmap(scratch, scratchBytes) }
            close(job.fd)
            let now = monotonicNanoseconds()
            state.withLock { st in
                st.ending = ending
                st.endNs = now
                if let lastError { st.lastError = lastError }
            }
        }
        guard let scratch, scratch != MAP_FAILED else {
            lastError = "scratch memory for the filler: \(Errno(rawValue: errno))"
            counters.skipped.store(planned, ordering: .relaxed)
            return
        }
        let fd = job.fd
        if let table = job.table, let ds = deferredSource {
            fillDeferred(job, table, ds, &ending, &lastError)
            return
        }
        // The list, then the parts skipped because the faults went past them (most of those
        // pages faulted meanwhile and are passed over without an ioctl).
        var requestedChunks = 0
        var segments: [Range<Int>] = [0..<runs.count]
        var q = 0
        outer: while q < segments.count {
            var i = segments[q].lowerBound
            let end = segments[q].upperBound
            while i < end {
                if stopRequested.load(ordering: .relaxed) { ending = .stopped; break outer }
                if let stopWhen = job.stopWhen, stopWhen() { ending = .handlerStopped; break outer }
                if q == 0 && followsFaults {
                    // The process is already further down the list: installing what it has
                    // passed helps less than staying ahead of it. Come back for those later.
                    let f = tracker.frontier
                    if f >= runRanks[i] {
                        var lo = i, hi = end
                        while lo < hi {
                            let mid = (lo + hi) / 2
                            if runRanks[mid] <= f { lo = mid + 1 } else { hi = mid }
                        }
                        segments.append(i..<lo)
                        counters.skippedAhead.add(lo - i, ordering: .relaxed)
                        i = lo
                        if i >= end { break }
                    }
                }
                if !chunkOrder.isEmpty, let chunked = source as? ChunkedSource {
                    // Keep `chunksAhead` chunks of the list on their way (joined if in flight);
                    // never the chunks of runs jumped over (the faults took them).
                    requestedChunks = Swift.max(requestedChunks, runChunkPosition[i])
                    let want = Swift.min(chunkOrder.count, runChunkPosition[i] + options.chunksAhead)
                    while requestedChunks < want {
                        _ = chunked.prefetch(chunk: chunkOrder[requestedChunks], context: nil, done: prefetchDone)
                        requestedChunks += 1
                    }
                }
                yieldToFaults(fd)
                var bytes = 0
                var lo = UInt.max, hi: UInt = 0
                while i < end && (bytes == 0 || bytes + runs[i].length <= options.batchBytes) {
                    // The faults went past this run while the batch was being filled: end the
                    // batch here, the next one starts past them.
                    if bytes > 0 && q == 0 && followsFaults && tracker.frontier >= runRanks[i] { break }
                    let r = runs[i]
                    i += 1
                    bytes += r.length
                    switch fillRun(fd, r, ps, scratch, &lo, &hi, &lastError) {
                    case .ok: break
                    case .gone: ending = .processGone; break outer
                    case .stop: ending = .stopped; break outer
                    }
                }
                counters.batches.add(1, ordering: .relaxed)
                if hi > lo { wake(fd, lo, hi) }
            }
            q += 1
        }
    }

    /// The list through the handler's deferred table: each chunk claimed (a fault on it joins
    /// the claim), fetched by the source, delivered by its thread with one UFFDIO_COPY that
    /// wakes the joined faults. At most ``Options/deferredFetches`` in flight; before each claim
    /// the filler yields to queued faults; chunks whose recorded pages all faulted are passed
    /// over, chunks a fault's fetch has are left to it. A claim in flight longer than the
    /// handler's deadline, and every claim left when the filler ends early, is dropped: its range
    /// is woken (no fallback), so a joined fault re-faults and gets its own fetch.
    private func fillDeferred(_ job: Filler, _ table: DeferredTable, _ ds: any DeferredSource,
                              _ ending: inout Ending, _ lastError: inout String?) {
        let ps = range.pageSize
        let n = Swift.max(1, options.deferredFetches)
        let slots = UnsafeMutablePointer<cuffd_prefetch_result>.allocate(capacity: n)
        slots.initialize(repeating: cuffd_prefetch_result(), count: n)
        var pending = [(token: UInt64, chunk: Int, startNs: UInt64)?](repeating: nil, count: n)
        var inFlight = 0
        var gone = false
        let keepFree = UInt32(clamping: job.keepFree)

        func account(_ r: cuffd_prefetch_result, _ chunk: Int) {
            let c = deferredChunks[chunk]
            counters.faultsJoined.add(Int(r.joined), ordering: .relaxed)
            switch r.outcome {
            case Int32(CUFFD_OUTCOME_RESOLVED.rawValue), Int32(CUFFD_OUTCOME_EXISTED.rawValue):
                // The recorded pages count as installed or found present (a fault took them
                // first); the chunk's other pages came with it (the source's unit). Installed
                // (prefetched + extra) is what the copy copied: a chunk a fault's own fetch
                // filled first copied less than its unfaulted recorded pages (nothing, when
                // it filled all of it), and the rest of them were present.
                let recorded = c.pageSpan.count
                let copiedPages = Int(r.copied) / ps
                var present = chunkPages[c.pageSpan].reduce(0) { $0 + (tracker.faulted(page: $1) ? 1 : 0) }
                if present == 0 { present = Swift.min(recorded, Int(r.existed_pages)) }
                let installedRecorded = Swift.min(recorded - present, copiedPages)
                counters.existed.add(recorded - installedRecorded, ordering: .relaxed)
                counters.prefetched.add(installedRecorded, ordering: .relaxed)
                counters.extra.add(copiedPages - installedRecorded, ordering: .relaxed)
                counters.copies.add(1, ordering: .relaxed)
                // Only what this fetch copied counts as prefetched: a chunk a fault's own fetch
                // filled first (EXISTED, nothing copied) is not the prefetch's doing. Where the
                // copy went on past pages that existed, which pages it copied is not known: at
                // most as many as it copied are marked, so faults avoided never exceed installs.
                var budget = Int(r.copied) / ps
                var p = c.offset / ps
                let end = (c.offset + c.length) / ps
                while p < end && budget > 0 {
                    if tracker.faulted(page: p) { p += 1; continue }
                    var q = p + 1
                    while q < end && q - p < budget && !tracker.faulted(page: q) { q += 1 }
                    tracker.notePrefetched(firstPage: p, count: q - p)
                    budget -= q - p
                    p = q
                }
            case Int32(CUFFD_OUTCOME_GONE.rawValue):
                if r.error == ESRCH { gone = true }
                counters.skipped.add(c.pageSpan.count, ordering: .relaxed)
            default:
                counters.dropped.add(1, ordering: .relaxed)
                counters.skipped.add(c.pageSpan.count, ordering: .relaxed)
                if r.error != ECANCELED { counters.sourceErrors.add(1, ordering: .relaxed) }
                lastError = "prefetch of offset \(c.offset)+\(c.length): \(Errno(rawValue: r.error))"
            }
        }
        /// Takes in what finished; drops claims older than the handler's deadline.
        func reap() {
            let now = monotonicNanoseconds()
            for i in 0..<n {
                guard let p = pending[i] else { continue }
                var r = cuffd_prefetch_result()
                if cuffd_deferred_claim_result(table.raw, slots + i, &r) == 0 {
                    guard now &- p.startNs > table.deadlineNanos else { continue }
                    _ = cuffd_deferred_abandon(table.raw, p.token, ETIMEDOUT)
                    guard cuffd_deferred_claim_result(table.raw, slots + i, &r) != 0 else { continue }
                }
                account(r, p.chunk)
                pending[i] = nil
                inFlight -= 1
            }
        }
        defer {
            // Claims still out are dropped (a delivery in progress ends first); after a
            // handler's cancel nothing writes the slots any more.
            for i in 0..<n {
                guard let p = pending[i] else { continue }
                _ = cuffd_deferred_abandon(table.raw, p.token, ECANCELED)
                var r = cuffd_prefetch_result()
                if cuffd_deferred_claim_result(table.raw, slots + i, &r) != 0 {
                    account(r, p.chunk)
                } else {
                    // Cancelled with the handler: woken, nothing installed.
                    counters.dropped.add(1, ordering: .relaxed)
                    counters.skipped.add(deferredChunks[p.chunk].pageSpan.count, ordering: .relaxed)
                }
            }
            slots.deallocate()
        }
        /// Waits until some claim in the table ends (the fillers of other regions of the
        /// same handler claim in it too), at most `timeout` ns.
        func awaitAClaim(timeout: UInt64 = 20_000_000) -> Int32 {
            let now = cuffd_deferred_claims_wait(table.raw, UInt32.max, 0)
            guard now > 0 else { return now }
            return cuffd_deferred_claims_wait(table.raw, UInt32(now), timeout)
        }
        func shouldEnd() -> Bool {
            if stopRequested.load(ordering: .relaxed) { ending = .stopped; return true }
            if let stopWhen = job.stopWhen, stopWhen() { ending = .handlerStopped; return true }
            if gone { ending = .processGone; return true }
            return false
        }

        var ci = 0
        while ci < deferredChunks.count {
            if shouldEnd() { return }
            reap()
            if inFlight >= n {
                if awaitAClaim() == -ESHUTDOWN {
                    ending = .handlerStopped
                    return
                }
                continue
            }
            let c = deferredChunks[ci]
            if chunkPages[c.pageSpan].allSatisfy({ tracker.faulted(page: $0) }) {
                counters.existed.add(c.pageSpan.count, ordering: .relaxed)
                ci += 1
                continue
            }
            guard let addr = range.address(ofOffset: c.offset), let at = range.locate(addr),
                  Int(at.segmentEnd - addr) >= c.length else {
                counters.skipped.add(c.pageSpan.count, ordering: .relaxed)  // unmapped or split since
                ci += 1
                continue
            }
            yieldToFaults(job.fd)
            let slot = pending.firstIndex(where: { $0 == nil })!
            var token: UInt64 = 0
            let rc = cuffd_deferred_claim(table.raw, UInt64(addr), UInt64(c.length), UInt64(ps), keepFree, slots + slot, &token)
            switch rc {
            case 1:
                pending[slot] = (token, ci, monotonicNanoseconds())
                inFlight += 1
                counters.deferredChunks.add(1, ordering: .relaxed)
                counters.batches.add(1, ordering: .relaxed)
                ds.fetch(offset: c.offset, length: c.length, into: DeferredFetch(table: table, token: token, address: addr, length: c.length))
                ci += 1
            case 0:
                // A fault's fetch has the chunk: its recorded pages are the fault's.
                counters.takenByFaults.add(1, ordering: .relaxed)
                counters.existed.add(c.pageSpan.count, ordering: .relaxed)
                ci += 1
            case -ENOSPC:
                // The faults' share of the table is in use: they come first.
                if inFlight == 0 { usleep(200) } else { _ = awaitAClaim(timeout: 1_000_000) }
            case -ESHUTDOWN:
                ending = .handlerStopped
                return
            default:
                counters.skipped.add(c.pageSpan.count, ordering: .relaxed)
                lastError = "prefetch claim of \(hex(addr))+\(c.length): \(Errno(rawValue: -rc))"
                ci += 1
            }
        }
        while inFlight > 0 {
            if shouldEnd() { return }
            reap()
            if inFlight > 0, awaitAClaim() == -ESHUTDOWN {
                ending = .handlerStopped
                return
            }
        }
        if gone { ending = .processGone }
    }

    /// Installs one run: pages a fault already took are passed over (no source read, no
    /// ioctl); the rest in pieces contiguous in both image and address space.
    private func fillRun(_ fd: Int32, _ r: (offset: Int, length: Int), _ ps: Int, _ scratch: UnsafeMutableRawPointer,
                         _ lo: inout UInt, _ hi: inout UInt, _ lastError: inout String?) -> Install {
        var done = 0
        while done < r.length {
            let off = r.offset + done
            let page = off / ps
            if tracker.faulted(page: page) {
                counters.existed.add(1, ordering: .relaxed)
                done += ps
                continue
            }
            guard let addr = range.address(ofOffset: off), let at = range.locate(addr) else {
                counters.skipped.add(1, ordering: .relaxed)  // unmapped since
                done += ps
                continue
            }
            let limit = Swift.min(r.length - done, Int(at.segmentEnd - addr))
            var n = ps
            while n < limit && !tracker.faulted(page: page + n / ps) { n += ps }
            let src: UnsafeRawPointer
            do {
                src = try source.bytes(at: off, count: n, scratch: scratch)
            } catch {
                counters.sourceErrors.add(1, ordering: .relaxed)
                counters.skipped.add(n / ps, ordering: .relaxed)
                lastError = "source at offset \(off): \(error)"
                done += n
                continue
            }
            let result = install(fd, addr, src, n, ps, &lo, &hi, &lastError)
            if result != .ok { return result }
            done += n
        }
        return .ok
    }

    private enum Install { case ok, gone, stop }

    /// Copies `n` bytes to `addr` with DONTWAKE, going on after pages that exist.
    private func install(_ fd: Int32, _ addr: UInt, _ src: UnsafeRawPointer, _ n: Int, _ ps: Int,
                         _ lo: inout UInt, _ hi: inout UInt, _ lastError: inout String?) -> Install {
        var k = 0
        var eagains = 0
        while k < n {
            var copied: Int64 = 0
            let rc = cuffd_copy(fd, UInt64(addr) + UInt64(k), UInt64(UInt(bitPattern: src)) + UInt64(k), UInt64(n - k),
                                UInt64(UFFDIO_COPY_MODE_DONTWAKE), &copied)
            counters.copies.add(1, ordering: .relaxed)
            if copied > 0 {
                let c = Int(copied) / ps * ps
                if let first = range.offset(of: addr + UInt(k)) {
                    tracker.notePrefetched(firstPage: first / ps, count: c / ps)
                }
                counters.prefetched.add(c / ps, ordering: .relaxed)
                lo = Swift.min(lo, addr + UInt(k))
                hi = Swift.max(hi, addr + UInt(k + c))
                k += c
            }
            if rc == 0 { break }
            switch -rc {
            case EEXIST:
                // A fault (or readahead) installed this page first: normal, counted, skipped.
                counters.existed.add(1, ordering: .relaxed)
                k += ps
            case EAGAIN:
                // The address space is changing (an event the readers have not read yet).
                counters.retries.add(1, ordering: .relaxed)
                eagains += 1
                if stopRequested.load(ordering: .relaxed) { return .stop }
                if eagains > 20_000 {
                    lastError = "UFFDIO_COPY at \(hex(addr + UInt(k))): EAGAIN for 1 s, page skipped"
                    counters.skipped.add(1, ordering: .relaxed)
                    k += ps
                    eagains = 0
                } else {
                    usleep(50)
                }
            case ESRCH:
                return .gone
            case ENOENT:
                // Unregistered or unmapped meanwhile: the rest of this piece is gone.
                counters.skipped.add((n - k) / ps, ordering: .relaxed)
                return .ok
            default:
                lastError = "UFFDIO_COPY at \(hex(addr + UInt(k))): \(Errno(rawValue: -rc))"
                counters.skipped.add(1, ordering: .relaxed)
                k += ps
            }
        }
        return .ok
    }

    /// One UFFDIO_WAKE over the batch's span: threads that faulted on a page the batch
    /// installed (their fault not read yet) retry and find it.
    private func wake(_ fd: Int32, _ lo: UInt, _ hi: UInt) {
        _ = cuffd_wake(fd, UInt64(lo), UInt64(hi - lo))
        counters.wakes.add(1, ordering: .relaxed)
    }

    /// While faults are queued (the fd is readable) give the CPU to the readers, for at most
    /// ``Options/maxWaitForFaults``.
    private func yieldToFaults(_ fd: Int32) {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 0) > 0, p.revents & Int16(POLLIN) != 0 else { return }
        counters.yielded.add(1, ordering: .relaxed)
        let deadline = monotonicNanoseconds() + UInt64(options.maxWaitForFaults * 1e9)
        var spins = 0
        repeat {
            if spins < 4 { sched_yield() } else { usleep(20) }
            spins += 1
            p.revents = 0
            if stopRequested.load(ordering: .relaxed) { return }
        } while poll(&p, 1, 0) > 0 && p.revents & Int16(POLLIN) != 0 && monotonicNanoseconds() < deadline
    }
}

/// Chunks requested ahead need no completion: the filler's read finds them cached or joins them.
private let prefetchDone: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?) -> Void = { _, _, _ in }

/// The filler thread's entry: takes over the retain done by `start()`.
private func fillerMain(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let job = Unmanaged<Prefetcher.Filler>.fromOpaque(arg!).takeRetainedValue()
    job.owner.fill(job)
    return nil
}
