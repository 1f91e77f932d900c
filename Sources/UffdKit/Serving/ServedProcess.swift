import CUffd
import Foundation
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How a ``ServedProcess`` serves faults.
public struct ServeOptions: Sendable {
    /// Reader threads per served process.
    public var readers: Int = 1
    /// CPUs to pin readers to (nil: not pinned).
    public var cpus: [Int]? = nil
    /// Readahead window in bytes per fault (nil: one page per fault). Rounded up to the region's
    /// page size; a 2 MiB region resolves at least a whole huge page.
    public var readaheadBytes: Int? = nil
    /// Adaptive readahead between one page and `readaheadBytes`.
    public var adaptiveReadahead: Bool = false
    /// What a fault that cannot be served (a memory file read error) gets.
    public var fallback: FaultHandler.Fallback = .poison
    /// A read-only shared mapping of the whole memory file: UFFDIO_COPY then copies straight
    /// from the page cache (one copy instead of pread's two). nil: pread per fault.
    public var memoryFileMapping: MemoryFileMapping? = nil
    /// Serve from this image instead of the memory file (a remote or packed snapshot, from
    /// ``PageSources/shared(_:options:)`` so that every VM restored from it shares one chunk
    /// cache). A ``DeferredSource`` (``ChunkedSource``) is served on the deferred path: the
    /// reader requests a region's chunk and goes on; a fetch that fails gets the fallback for
    /// that chunk and is reported through ``onFailure``. Regions that do not start on a chunk
    /// boundary, or whose pages are larger than a chunk, are read synchronously.
    /// The readahead options do not apply to deferred regions (the chunk is the unit).
    public var source: (any PageSource)? = nil
    /// Non-blocking reads before each poll (busy polling: lower wake latency, a busy CPU).
    public var spinPolls: UInt32 = 0
    /// Called on a reader thread for each fault that could not be served.
    public var onFailure: (@Sendable (HandlerFailure) -> Void)? = nil
    /// Record each region's first faults (``ServedProcess/workingSet()``); needs ``imageIdentity``.
    public var recordWorkingSet: Bool = false
    /// A working set recorded from this memory file, installed at start by a ``Prefetcher`` per
    /// region beside the handler; needs ``imageIdentity``.
    public var prefetch: WorkingSet? = nil
    /// The filler's configuration.
    public var prefetchOptions = Prefetcher.Options()
    /// The memory file's identity (``WorkingSet/Identity/init(of:)``), taken once by the server.
    public var imageIdentity: WorkingSet.Identity? = nil

    /// One reader, no readahead, poison fallback.
    public init() {}
}

/// Serves the faults of one process whose uffd was handed over: its regions from the memory
/// file by region offset, removed ranges (UFFD_EVENT_REMOVE: balloon, MADV_DONTNEED) unregistered
/// so the kernel zero-fills them from then on (also on hugetlb, where ZEROPAGE does not exist;
/// and the state lives in the kernel, so it survives a restart of the server), its own handler,
/// policy and stats.
public final class ServedProcess: Sendable {
    /// A number unique in this server (also across restarts when the caller assigns it).
    public let id: Int
    /// The adopted uffd.
    public let uffd: Userfaultfd
    /// The regions served.
    public let regions: [GuestRegion]
    /// The process that sent the uffd.
    public let peer: PeerCredentials
    /// The connection the uffd came over (owned; closed by ``stop()``), or -1.
    public let connection: Int32
    /// The peer's start time (clock ticks since boot, /proc/PID/stat), to tell it from a reused pid.
    public let peerStartTime: UInt64?
    /// The fault handler.
    public let handler: FaultHandler
    private let policy: ServingPolicy
    /// When serving started (CLOCK_MONOTONIC ns).
    public let startedNs: UInt64
    /// Per region (same order as ``regions``) when recording or prefetching.
    private let tracking: [(tracker: WorkingSetTracker, range: ServedRange, source: any PageSource)]
    private let prefetchPlan: (WorkingSet, Prefetcher.Options, WorkingSet.Identity)?
    private let identity: WorkingSet.Identity?
    private let fillers = Mutex<[Prefetcher]>([])

    /// Adopts a received hand-off and builds its policy (not started). The regions must have
    /// been validated against the file (``GuestRegion/validate(_:memoryFileLength:)``).
    /// `memoryFile` is unused (pass -1) when `options.source` is set.
    public init(id: Int, handoff: ReceivedHandoff, connection: Int32, memoryFile: Int32, options: ServeOptions,
                peerStartTime: UInt64? = nil) throws(UffdError) {
        self.id = id
        self.uffd = handoff.uffd
        self.regions = handoff.regions
        self.peer = handoff.peer
        self.connection = connection
        self.peerStartTime = peerStartTime ?? ServedProcess.startTime(of: handoff.peer.pid)
        let tracks = options.recordWorkingSet || options.prefetch != nil
        if tracks && options.imageIdentity == nil {
            throw UffdError(.argument, .invalidArgument, detail: "recording or prefetching a working set needs the memory file's identity (ServeOptions.imageIdentity)")
        }
        var routes: [RouterPolicy.Route] = []
        var tracking: [(tracker: WorkingSetTracker, range: ServedRange, source: any PageSource)] = []
        for r in handoff.regions {
            if let image = options.source as? any DeferredSource,
               DeferredImageWindow.usable(image: image, offset: r.offset, pageSize: r.pageSize) {
                let window = DeferredImageWindow(image: image, offset: r.offset, length: r.size)
                let deferred = DeferredCopyPolicy(destination: r.baseHostVirtAddr, source: window, pageSize: r.pageSize)
                var p: any FaultPolicy = deferred
                if tracks, let whole = options.source {
                    // Recorded like any region; a filler reads through the same shared cache.
                    let range = ServedRange(start: r.baseHostVirtAddr, length: r.size, pageSize: r.pageSize)
                    let tracker = try WorkingSetTracker(range: range, recording: options.recordWorkingSet, imageOffset: r.offset)
                    p = WorkingSetPolicy(deferred, tracker: tracker)
                    tracking.append((tracker, range, ImageWindow(image: whole, offset: r.offset, length: r.size)))
                }
                routes.append(.init(start: r.baseHostVirtAddr, length: r.size, policy: p))
                continue
            }
            let source: any PageSource
            if let image = options.source {
                source = ImageWindow(image: image, offset: r.offset, length: r.size)
            } else if let map = options.memoryFileMapping {
                source = MappedFileSource(base: map.address + UInt(r.offset), length: r.size)
            } else {
                source = MemoryFileSource(fd: memoryFile, fileOffset: r.offset, length: r.size)
            }
            let range = ServedRange(start: r.baseHostVirtAddr, length: r.size, pageSize: r.pageSize)
            let copy = CopyPolicy(range: range, source: source)
            var p: any FaultPolicy
            // Tracking wraps the region's concrete policy (first faults at file offsets).
            let tracker = tracks ? try WorkingSetTracker(range: range, recording: options.recordWorkingSet, imageOffset: r.offset) : nil
            if let ra = options.readaheadBytes, ra > r.pageSize {
                let pages = (ra + r.pageSize - 1) / r.pageSize
                let rp = ReadaheadPolicy(copy, window: options.adaptiveReadahead ? .adaptive(minPages: 1, maxPages: pages) : .fixed(pages: pages))
                p = rp
                if let tracker { p = WorkingSetPolicy(rp, tracker: tracker) }
            } else {
                p = copy
                if let tracker { p = WorkingSetPolicy(copy, tracker: tracker) }
            }
            if let tracker { tracking.append((tracker, range, source)) }
            routes.append(.init(start: r.baseHostVirtAddr, length: r.size, policy: p))
        }
        self.tracking = tracking
        self.identity = options.imageIdentity
        self.prefetchPlan = options.prefetch.map { ($0, options.prefetchOptions, options.imageIdentity!) }
        policy = ServingPolicy(router: try RouterPolicy(routes), regions: handoff.regions)
        var ho = FaultHandler.Options()
        ho.readers = Swift.max(1, options.readers)
        ho.cpus = options.cpus
        ho.fallback = options.fallback
        ho.spinPolls = options.spinPolls
        ho.onFailure = options.onFailure
        ho.forkHandling = .release
        ho.threadName = "serve-\(id)"
        // Huge-page coverage of the guest memory at each stats(): its pagemap is opened now, while
        // the peer is known alive, so a later process reusing the pid is never measured. A peer
        // in another pid namespace (pid 0) or one we may not ptrace is served unmeasured.
        if handoff.peer.pid > 0, let pm = try? ProcessPagemap(pid: handoff.peer.pid) {
            ho.hugePageCoverage = .init(pagemap: pm, ranges: handoff.regions.map {
                ServedRange(start: $0.baseHostVirtAddr, length: $0.size, pageSize: $0.pageSize)
            })
        }
        handler = FaultHandler(uffd: handoff.uffd, policy: policy, options: ho)
        startedNs = cuffd_now_ns()
    }

    /// Starts the readers, then (with ``ServeOptions/prefetch``) a filler per region. A
    /// recording that does not match the memory file fails here, before anything is installed.
    public func start() throws(UffdError) {
        for t in tracking { t.tracker.restartClock() }
        try handler.start()
        guard let (ws, o, identity) = prefetchPlan else { return }
        var started: [Prefetcher] = []
        for (i, t) in tracking.enumerated() {
            var po = o
            po.threadName = "prefetch-\(id)-\(i)"
            do {
                let p = try Prefetcher(uffd: uffd, range: t.range, source: t.source, workingSet: ws, tracker: t.tracker,
                                       imageOffset: regions[i].offset, imageIdentity: identity, options: po)
                try p.start(alongside: handler)
                started.append(p)
            } catch {
                started.forEach { $0.stop() }
                throw (error as? UffdError) ?? UffdError(.source, .ioError, detail: "prefetch: \(error)")
            }
        }
        fillers.withLock { $0 = started }
    }

    /// This process's recording so far (``ServeOptions/recordWorkingSet``): every region's
    /// first faults at memory-file offsets, in time order. nil when not recording.
    public func workingSet() -> WorkingSet? {
        guard let identity, !tracking.isEmpty, tracking[0].tracker.isRecording else { return nil }
        return try? WorkingSet.combined(tracking.map { $0.tracker.workingSet(identity: identity) })
    }

    /// What the prefetch did, summed over the regions (nil without ``ServeOptions/prefetch``).
    public func prefetchStats() -> Prefetcher.Stats? {
        let fs = fillers.withLock { $0 }
        guard prefetchPlan != nil, !fs.isEmpty else { return nil }
        var total = Prefetcher.Stats()
        var finished = true
        for f in fs {
            let s = f.stats()
            total.pageSize = s.pageSize
            total.plannedPages += s.plannedPages
            total.prefetchedPages += s.prefetchedPages
            total.alreadyPresentPages += s.alreadyPresentPages
            total.skippedPages += s.skippedPages
            total.faultsOnPrefetchedPages = (total.faultsOnPrefetchedPages ?? 0) + (s.faultsOnPrefetchedPages ?? 0)
            total.faultsAvoided = (total.faultsAvoided ?? 0) + (s.faultsAvoided ?? 0)
            total.batches += s.batches
            total.copies += s.copies
            total.wakes += s.wakes
            total.yieldedToFaults += s.yieldedToFaults
            total.runsSkippedAhead += s.runsSkippedAhead
            total.retries += s.retries
            total.sourceErrors += s.sourceErrors
            total.deferredChunks += s.deferredChunks
            total.faultsJoined += s.faultsJoined
            total.chunksTakenByFaults += s.chunksTakenByFaults
            total.droppedFetches += s.droppedFetches
            total.extraPages += s.extraPages
            total.lastError = s.lastError ?? total.lastError
            total.seconds = Swift.max(total.seconds, s.seconds)
            if s.ending != .finished { finished = false }
            if total.ending == nil || s.ending != .finished { total.ending = s.ending }
        }
        if finished { total.timeToLastPage = total.seconds }
        return total
    }

    /// What a fault that cannot be served gets on this uffd: POISON only exists when the
    /// sender enabled UFFD_FEATURE_POISON (Firecracker does not); the loop zero-fills otherwise.
    public var effectiveFallback: FaultHandler.Fallback {
        handler.options.fallback == .poison && !uffd.features.contains(.poison) ? .zeroFill : handler.options.fallback
    }

    /// UFFDIO_WAKE over every region: after a restart, threads whose fault the previous server
    /// read but never resolved are no longer queued; woken, they fault again and are served.
    public func wakeAll() {
        for r in regions { try? uffd.wake(r.baseHostVirtAddr, length: r.size) }
    }

    /// Stops the readers (queued faults are resolved first), closes the connection and the uffd.
    public func stop() {
        fillers.withLock { $0 }.forEach { $0.stop() }
        handler.stop()
        if connection >= 0 { Glibc.close(connection) }
        uffd.close()
    }

    /// Nanoseconds from the start of serving to the first fault (nil: none yet).
    public var timeToFirstFaultNs: UInt64? {
        let t = policy.firstFaultNs.load(ordering: .relaxed)
        return t == 0 ? nil : t &- startedNs
    }

    /// Bytes of removed ranges unregistered (served as zeros by the kernel since).
    public var removedBytes: UInt64 { policy.removedBytes.load(ordering: .relaxed) }

    /// Whether the peer process still exists (same pid and start time). A pid of 0 (another
    /// pid namespace) counts as alive; the connection's end then decides.
    public var peerAlive: Bool {
        guard peer.pid > 0 else { return true }
        guard let t = ServedProcess.startTime(of: peer.pid) else { return false }
        if let peerStartTime { return t == peerStartTime }
        return true
    }

    /// Whether the peer closed its end of the connection (or there is none).
    public var connectionClosed: Bool {
        guard connection >= 0 else { return true }
        var p = pollfd(fd: connection, events: Int16(POLLIN) | pollRDHUP, revents: 0)
        guard poll(&p, 1, 0) > 0 else { return false }
        if p.revents & (Int16(POLLHUP) | pollRDHUP | Int16(POLLERR)) != 0 { return true }
        // Data after the hand-off is not part of the protocol: read and drop it; EOF is the end.
        var buf = [UInt8](repeating: 0, count: 512)
        let n = recv(connection, &buf, buf.count, Int32(MSG_DONTWAIT))
        return n == 0
    }

    /// The process's start time (field 22 of /proc/PID/stat), nil when it does not exist.
    public static func startTime(of pid: Int32) -> UInt64? {
        guard pid > 0, let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After "(comm)": state is field 3, starttime field 22 -> index 19.
        guard fields.count > 19, fields[0] != "Z" && fields[0] != "X" else { return nil }
        return UInt64(fields[19])
    }

    /// The counters so far (the summary when the process went away): taken while it runs, the
    /// huge-page coverage is measured now; once it is gone, it is the last measured.
    public func summary() -> ServeSummary {
        let s = handler.stats()
        return ServeSummary(id: id, peer: peer, faults: s.faults, bytes: s.bytes,
                            timeToFirstFaultNs: timeToFirstFaultNs,
                            p50Ns: s.latency.totalCount > 0 ? s.latency.valueAtPercentile(50) : nil,
                            p99Ns: s.latency.totalCount > 0 ? s.latency.valueAtPercentile(99) : nil,
                            removeEvents: s.removeEvents, removedBytes: removedBytes, retries: s.retries,
                            fallbacks: s.fallbacks, failures: s.failures + UInt64(handler.loopErrors().count),
                            servedNs: cuffd_now_ns() &- startedNs, hugePageCoverage: s.hugePageCoverage,
                            hugePageCoverageAgeNs: s.hugePageCoverageMeasuredNs.map { cuffd_now_ns() &- $0 })
    }
}

/// What serving one process amounted to.
public struct ServeSummary: Sendable, CustomStringConvertible {
    /// The served process's id in the server.
    public var id: Int
    /// Who it was.
    public var peer: PeerCredentials
    /// Faults read.
    public var faults: UInt64
    /// Bytes resolved.
    public var bytes: UInt64
    /// From the start of serving to the first fault.
    public var timeToFirstFaultNs: UInt64?
    /// Resolution latency percentiles.
    public var p50Ns: UInt64?
    /// Resolution latency percentiles.
    public var p99Ns: UInt64?
    /// UFFD_EVENT_REMOVE events seen.
    public var removeEvents: UInt64
    /// Bytes of removed ranges unregistered.
    public var removedBytes: UInt64
    /// Resolutions retried after EAGAIN (an unread event or a changing address space).
    public var retries: UInt64
    /// Faults that got the fallback (memory file errors).
    public var fallbacks: UInt64
    /// Faults whose fallback failed too, plus loop errors.
    public var failures: UInt64
    /// How long it was served.
    public var servedNs: UInt64
    /// Bytes of the guest memory mapped by huge pages, out of the regions' bytes (nil: not
    /// measured: no pid to measure, or gone before the first measurement). For a process that
    /// is gone it is the last value measured while it ran: see ``hugePageCoverageAgeNs``.
    public var hugePageCoverage: HugePageCoverage? = nil
    /// How long before this summary ``hugePageCoverage`` was measured (≈0 while the process runs).
    public var hugePageCoverageAgeNs: UInt64? = nil

    /// Whether every fault was served from the file.
    public var clean: Bool { fallbacks == 0 && failures == 0 }

    /// One line.
    public var description: String {
        func us(_ v: UInt64?) -> String { v.map { String(format: "%.1fus", Double($0) / 1000) } ?? "-" }
        return "faults=\(faults) bytes=\(bytes) first_fault=\(us(timeToFirstFaultNs)) p50=\(us(p50Ns)) p99=\(us(p99Ns)) "
            + "removes=\(removeEvents) removed_bytes=\(removedBytes) retries=\(retries) fallbacks=\(fallbacks) failures=\(failures) "
            + String(format: "served=%.3fs", Double(servedNs) / 1e9)
            + (hugePageCoverage.map { " huge_page_bytes=\($0.hugePageBytes)/\($0.bytes)" } ?? "")
    }
}

/// The router over the regions, plus what serving needs on top: the time of the first fault
/// and REMOVE events turned into UFFDIO_UNREGISTER of the removed pages.
final class ServingPolicy: FaultPolicy {
    let router: RouterPolicy
    let regions: [GuestRegion]
    let firstFaultNs = Atomic<UInt64>(0)
    let removedBytes = Atomic<UInt64>(0)

    init(router: RouterPolicy, regions: [GuestRegion]) {
        self.router = router
        self.regions = regions
    }

    var scratchBytes: Int { router.scratchBytes }

    @inline(__always)
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if firstFaultNs.load(ordering: .relaxed) == 0 {
            _ = firstFaultNs.compareExchange(expected: 0, desired: cuffd_now_ns(), ordering: .relaxed)
        }
        return try router.resolve(fault, context: context)
    }

    /// A removed range reads as zeros from now on: unregister the whole pages of it in each
    /// region (the kernel then maps zero pages on the next touch, hugetlb included). The
    /// unregister wakes threads waiting in the range; their queued faults then fail with ENOENT,
    /// which the loop counts as gone.
    func handle(event: Event, context: borrowing FaultContext) {
        guard case .remove(let start, let end) = event else {
            router.handle(event: event, context: context)
            return
        }
        for r in regions {
            let lo = Swift.max(start, r.baseHostVirtAddr), hi = Swift.min(end, r.end)
            guard lo < hi else { continue }
            let mask = UInt(r.pageSize - 1)
            let a = (lo + mask) & ~mask, b = hi & ~mask
            guard a < b else { continue }
            if cuffd_unregister(context.fd, UInt64(a), UInt64(b - a)) == 0 {
                removedBytes.add(UInt64(b - a), ordering: .relaxed)
            }
        }
    }
}

/// POLLRDHUP (a GNU extension the Glibc module does not import).
let pollRDHUP: Int16 = 0x2000
