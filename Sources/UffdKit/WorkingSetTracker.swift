import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Which pages of a served range have faulted (and which a ``Prefetcher`` installed), and,
/// when recording, the order and time of each page's first fault: the working set of this run.
///
/// The fault path (``noteFault(_:)``, called by ``WorkingSetPolicy``) costs one relaxed atomic
/// OR on a byte per page and, for a page's first fault when recording, a clock read and two
/// stores into a slot claimed with one atomic add. Both tables are mapped up front with
/// MAP_NORESERVE (a page of the tables costs memory only once touched), so nothing allocates
/// or locks per fault. A page faults "first" once: a page dropped by MADV_DONTNEED and faulted
/// again is not recorded twice.
public final class WorkingSetTracker: @unchecked Sendable {
    /// The memory tracked (follows remaps: offsets are logical, as in the image).
    public let range: ServedRange
    /// The page size (the unit of the tables).
    public let pageSize: Int
    /// Pages in the range.
    public let pages: Int
    /// Whether first faults are recorded (false: only the page states are kept, for prefetch stats).
    public let isRecording: Bool
    /// Where the range starts in the image (a region of a larger image, e.g. one of a VM's
    /// memory regions in its memory file): recorded offsets are image offsets.
    public let imageOffset: Int

    let states: UnsafeMutablePointer<UInt8>
    private let order: UnsafeMutablePointer<UInt64>?
    private let statesBytes: Int
    private let orderBytes: Int
    private let shift: Int
    private let next = Atomic<Int>(0)
    private let late = Atomic<Int>(0)
    private let start = Atomic<UInt64>(0)
    /// A prefetcher's list position per page (Int32, -1: not listed), published once; 0: none.
    private let ranks = Atomic<UInt>(0)
    private var ranksBytes = 0
    /// The furthest list position a fault reached (-1: none): the filler skips ahead of it.
    private let frontierRank = Atomic<Int>(-1)

    /// Tracks `range`, which holds the image's bytes from `imageOffset` on; `recording` also
    /// keeps the first-fault order and times.
    /// - Throws: ``UffdError`` `.map` when the tables cannot be mapped.
    public init(range: ServedRange, recording: Bool, imageOffset: Int = 0) throws(UffdError) {
        self.range = range
        self.imageOffset = imageOffset
        pageSize = range.pageSize
        pages = (range.length + pageSize - 1) / pageSize
        isRecording = recording
        shift = pageSize.trailingZeroBitCount
        let page = basePageSize
        statesBytes = Swift.max(page, (pages + page - 1) / page * page)
        orderBytes = recording ? Swift.max(page, (pages * 16 + page - 1) / page * page) : 0
        guard let s = mmap(nil, statesBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              s != MAP_FAILED else {
            throw UffdError(.map, Errno(rawValue: errno), detail: "working-set page table of \(statesBytes) bytes")
        }
        states = s.assumingMemoryBound(to: UInt8.self)
        if recording {
            guard let o = mmap(nil, orderBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  o != MAP_FAILED else {
                let e = errno
                munmap(s, statesBytes)
                throw UffdError(.map, Errno(rawValue: e), detail: "working-set order table of \(orderBytes) bytes")
            }
            order = o.assumingMemoryBound(to: UInt64.self)
        } else {
            order = nil
        }
        start.store(monotonicNanoseconds(), ordering: .relaxed)
    }

    deinit {
        let r = ranks.load(ordering: .acquiring)
        if r != 0 { munmap(UnsafeMutableRawPointer(bitPattern: r), ranksBytes) }
        munmap(states, statesBytes)
        if let order { munmap(order, orderBytes) }
    }

    /// Restarts the clock the recorded times count from (e.g. at the hand-off of the memory).
    public func restartClock() { start.store(monotonicNanoseconds(), ordering: .relaxed) }

    /// Notes a fault at `address` (fault path). Addresses outside the range are ignored.
    @inline(__always)
    public func noteFault(_ address: UInt) {
        guard let offset = range.offset(of: address) else { return }
        let index = offset >> shift
        let old = cuffd_page_state_set(states, index, UInt8(CUFFD_PAGE_FAULTED))
        if old & UInt8(CUFFD_PAGE_PREFETCHED) != 0 { late.add(1, ordering: .relaxed) }
        let r = ranks.load(ordering: .acquiring)
        if r != 0 {
            let rank = Int(UnsafePointer<Int32>(bitPattern: r)![index])
            // A racy max: a lost update only makes the filler skip ahead a little later.
            if rank > frontierRank.load(ordering: .relaxed) { frontierRank.store(rank, ordering: .relaxed) }
        }
        if old & UInt8(CUFFD_PAGE_FAULTED) == 0, let order {
            let slot = next.wrappingAdd(1, ordering: .relaxed).oldValue
            // Each page claims a slot once, so `pages` slots always suffice. Time 0 marks a
            // slot claimed but not yet written (seen only by a snapshot taken while running).
            let t = monotonicNanoseconds() &- start.load(ordering: .relaxed)
            order[2 * slot] = UInt64(index)
            order[2 * slot + 1] = t &+ 1
        }
    }

    /// Publishes the list position of each page of a prefetch (once; later calls are ignored).
    /// Returns whether the positions are in use.
    func publishRanks(_ pageIndexes: [Int]) -> Bool {
        guard ranks.load(ordering: .acquiring) == 0 else { return false }
        let bytes = Swift.max(basePageSize, (pages * 4 + basePageSize - 1) / basePageSize * basePageSize)
        guard let m = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              m != MAP_FAILED else { return false }
        let t = m.assumingMemoryBound(to: Int32.self)
        t.initialize(repeating: -1, count: pages)
        for (rank, i) in pageIndexes.enumerated() where i >= 0 && i < pages { t[i] = Int32(truncatingIfNeeded: rank) }
        ranksBytes = bytes
        let (exchanged, _) = ranks.compareExchange(expected: 0, desired: UInt(bitPattern: m), ordering: .acquiringAndReleasing)
        if !exchanged { munmap(m, bytes) }
        return exchanged
    }

    /// The furthest position in the prefetch list a fault has reached (-1: none).
    var frontier: Int { frontierRank.load(ordering: .relaxed) }

    /// Marks pages `[first, first+count)` as installed by the prefetch filler.
    func notePrefetched(firstPage: Int, count: Int) {
        for i in firstPage..<Swift.min(pages, firstPage + count) {
            let old = cuffd_page_state_set(states, i, UInt8(CUFFD_PAGE_PREFETCHED))
            // A fault noted between the filler's check and its UFFDIO_COPY, whose own COPY then
            // meets EEXIST: as late as one noted after the copy. Both sides OR their bit into
            // the same byte, so exactly one of them sees the other's and counts it.
            if old & UInt8(CUFFD_PAGE_FAULTED) != 0 { late.add(1, ordering: .relaxed) }
        }
    }

    /// Faults on pages the filler installed: queued before it got there, or noted while its
    /// copy was in flight (either way the fault's own copy meets EEXIST and wakes). With one
    /// fault per page, faults + prefetched pages - this = the pages made present.
    public var faultsOnPrefetchedPages: Int { late.load(ordering: .relaxed) }

    /// Whether page `index` faulted.
    public func faulted(page index: Int) -> Bool {
        index >= 0 && index < pages && cuffd_page_state_get(states, index) & UInt8(CUFFD_PAGE_FAULTED) != 0
    }

    /// Whether page `index` was installed by the filler.
    public func prefetched(page index: Int) -> Bool {
        index >= 0 && index < pages && cuffd_page_state_get(states, index) & UInt8(CUFFD_PAGE_PREFETCHED) != 0
    }

    /// Pages that faulted so far.
    public var faultedPages: Int { (0..<pages).reduce(0) { $0 + (faulted(page: $1) ? 1 : 0) } }

    /// The recording so far, first faults in order, at image offsets. Empty when not recording.
    /// The recordings of several regions of one image (restart their clocks together) combine
    /// with ``WorkingSet/combined(_:)``.
    public func workingSet(identity: WorkingSet.Identity) -> WorkingSet {
        var entries: [WorkingSet.Entry] = []
        if let order {
            let n = Swift.min(next.load(ordering: .acquiring), pages)
            entries.reserveCapacity(n)
            for i in 0..<n {
                let t = order[2 * i + 1]
                guard t != 0 else { continue }
                entries.append(WorkingSet.Entry(offset: imageOffset + Int(order[2 * i]) << shift, nanoseconds: t - 1))
            }
        }
        return WorkingSet(identity: identity, pageSize: pageSize, entries: entries)
    }
}

/// Wraps a policy so that every fault is noted in a ``WorkingSetTracker`` (first-fault
/// recording, prefetch accounting) before the wrapped policy resolves it. Write-protect faults
/// are not noted (the page is already there). A forked child is served by the wrapped policy's
/// child, untracked: it is another address space.
public final class WorkingSetPolicy<Inner: FaultPolicy>: FaultPolicy {
    /// The wrapped policy.
    public let inner: Inner
    /// Where faults are noted.
    public let tracker: WorkingSetTracker

    /// Notes faults in `tracker`, resolves them with `inner`.
    public init(_ inner: Inner, tracker: WorkingSetTracker) {
        self.inner = inner
        self.tracker = tracker
    }

    /// Notes the fault, then asks the wrapped policy.
    @inline(__always)
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if fault.kind != .writeProtect { tracker.noteFault(fault.address) }
        return try inner.resolve(fault, context: context)
    }

    /// The wrapped policy's scratch.
    public var scratchBytes: Int { inner.scratchBytes }

    /// Forwards events (the tracker's range is the wrapped policy's, which follows them).
    public func handle(event: Event, context: borrowing FaultContext) { inner.handle(event: event, context: context) }

    /// Forwards failures.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        inner.failed(fault, resolution: resolution, errno: errno, context: context)
    }

    /// The wrapped policy's child, untracked.
    public func forkedChild() -> any FaultPolicy { inner.forkedChild() }
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call).
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
