import SystemPackage
import Synchronization

/// Lazy loading at the speed of memory: missing faults are resolved a whole window (2 MiB) at a
/// time by a ``WindowInstaller`` — read once into a huge-page donor and moved into place with
/// UFFDIO_MOVE, prefetch threads installing the windows ahead of a sequential stream — and
/// everything the fast path cannot serve goes to the one-copy path, a ``ReadaheadPolicy`` over a
/// ``CopyPolicy`` of the same source (adaptive window up to `window`).
///
/// The fast path engages by itself: sequential faults start the prefetch, random ones install
/// their own window. Which path serves what:
/// - MOVE: an anonymous (private) destination that THP can back (`.automatic` checks the system
///   setting, `PR_GET_THP_DISABLE` and the VMA's `MADV_HUGEPAGE`/`MADV_NOHUGEPAGE`).
/// - COPY from the donor (same windows, one copy, no huge pages): THP unavailable, a
///   `MADV_NOHUGEPAGE` destination, shmem; or `mode: .copy`.
/// - the copy policy: the part of the range before the first window boundary, hugetlb, write-
///   protect and minor faults, and every fault after a remap event (the installer's addresses
///   are then stale: its prefetch stops; ``ServedRange`` keeps the copy path right).
///
/// REMOVE/UNMAP events mark the windows they touch not installed (a later fault installs them
/// again, by COPY where pages remain, like ``CopyPolicy``). A forked child is served by the copy
/// policy's child (the donors are `MADV_DONTFORK`).
public final class InstallPolicy: FaultPolicy, @unchecked Sendable {
    /// Which install path to use.
    public enum Mode: Sendable, Hashable {
        /// MOVE where THP can back the destination, else COPY from the donor.
        case automatic
        /// MOVE (copy fallback per window).
        case move
        /// COPY from the donor.
        case copy
    }

    /// The windows installer (nil: the fast path could not be set up, everything is copied).
    public let installer: WindowInstaller?
    /// The one-copy path (readahead over a copy policy of the same source).
    public let copyPath: ReadaheadPolicy<CopyPolicy>
    /// Why the fast path is not used, if it is not.
    public let fastPathUnavailable: String?
    private let fastPath: Atomic<Bool>

    /// Serves `region` (registered MISSING on `uffd`) from `source`; memory other than
    /// anonymous is served by COPY only.
    /// - Parameters:
    ///   - region: the memory served.
    ///   - uffd: the userfaultfd it is registered on (MISSING).
    ///   - source: the image (offset 0 at the region's start).
    ///   - mode: MOVE, COPY from the donor, or `.automatic` (MOVE where THP can back the region).
    ///   - window: bytes per window (a power of two; 2 MiB, the PMD size, moves huge pages whole).
    ///   - prefetchThreads: installer threads ahead of sequential streams (0...4).
    ///   - ahead: windows a stream is prefetched ahead.
    ///   - prefetchCPUs: their CPUs (pin them beside the faulting threads' CPUs).
    ///   - copyWindow: the copy path's readahead (nil: adaptive, up to `window`).
    public convenience init(region: MappedRegion, uffd: Userfaultfd, source: any PageSource, mode: Mode = .automatic,
                            window: Int = 2 << 20, prefetchThreads: Int = 1, ahead: Int = 8,
                            prefetchCPUs: [Int32] = [], copyWindow: ReadaheadPolicy<CopyPolicy>.Window? = nil) {
        var anon = false
        if case .anonymous = region.kind { anon = true }
        self.init(range: ServedRange(region: region), uffd: uffd, source: source,
                  mode: anon ? mode : .copy, window: window, prefetchThreads: prefetchThreads,
                  ahead: ahead, prefetchCPUs: prefetchCPUs, copyWindow: copyWindow, hugetlb: region.kind == .hugetlb)
    }

    /// Serves `range` (registered MISSING on `uffd`, anonymous memory for MOVE) from `source`;
    /// `hugetlb` memory is served by the copy path only. The other parameters are those of
    /// ``init(region:uffd:source:mode:window:prefetchThreads:ahead:prefetchCPUs:copyWindow:)``.
    public init(range: ServedRange, uffd: Userfaultfd, source: any PageSource, mode: Mode = .automatic,
                window: Int = 2 << 20, prefetchThreads: Int = 1, ahead: Int = 8, prefetchCPUs: [Int32] = [],
                copyWindow: ReadaheadPolicy<CopyPolicy>.Window? = nil, hugetlb: Bool = false) {
        let page = range.pageSize
        copyPath = ReadaheadPolicy(CopyPolicy(range: range, source: source),
                                   window: copyWindow ?? .adaptive(minPages: 1, maxPages: Swift.max(1, window / page)))
        let start = range.start
        let first = (start + UInt(window) - 1) / UInt(window) * UInt(window)
        let end = start + UInt(range.length)
        var reason: String? = nil
        var installer: WindowInstaller? = nil
        if hugetlb || page != basePageSize {
            reason = "huge-page memory (hugetlb): served by the copy path"
        } else if first >= end {
            reason = "the range holds no whole window boundary"
        } else {
            var m: WindowInstaller.Mode = mode == .copy ? .copy : .move
            if mode == .automatic && !WindowInstaller.thpEligible(first) {
                m = .copy
                reason = "THP cannot back the destination (THP off or MADV_NOHUGEPAGE): windows are copied from the donor"
            }
            do {
                installer = try WindowInstaller(uffd: uffd, start: first, length: Int(end - first), source: source,
                                                sourceOffset: Int(first - start), mode: m, window: window,
                                                prefetchThreads: prefetchThreads, ahead: ahead,
                                                prefetchCPUs: prefetchCPUs)
            } catch {
                reason = "window installer: \(error)"
            }
        }
        self.installer = installer
        fastPathUnavailable = reason
        fastPath = Atomic(installer != nil)
    }

    /// The largest read of the copy path.
    public var scratchBytes: Int { copyPath.scratchBytes }

    /// Whether faults still go to the installer (false after a remap event).
    public var fastPathActive: Bool { fastPath.load(ordering: .relaxed) }

    /// Installs the faulting window (fast path), or copies (the rest).
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if fault.kind == .missing, let installer, installer.contains(fault.address),
           fastPath.load(ordering: .relaxed) {
            try installer.install(faultAddress: fault.address)
            return .none // installed and woken by the installer (or by the thread installing it)
        }
        return try copyPath.resolve(fault, context: context)
    }

    /// Remap: the fast path stops (its addresses moved); remove/unmap: those windows are
    /// installed again on their next fault. The copy path follows every event.
    public func handle(event: Event, context: borrowing FaultContext) {
        switch event {
        case .remap:
            if fastPath.exchange(false, ordering: .relaxed) { installer?.stopPrefetching() }
        case .remove(let s, let e), .unmap(let s, let e):
            if e > s { installer?.forget(s, length: Int(e - s)) }
        default:
            break
        }
        copyPath.handle(event: event, context: context)
    }

    /// Forwards the copy path's failures.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        copyPath.failed(fault, resolution: resolution, errno: errno, context: context)
    }

    /// The child is served by the copy path's child (no donor, no installer there).
    public func forkedChild() -> any FaultPolicy { copyPath.forkedChild() }

    /// Stops the prefetch threads (call when the load is over or the handler stops).
    public func stopPrefetching() { installer?.stopPrefetching() }

    /// The installer's counters (zeros without one).
    public var stats: WindowInstaller.Stats {
        installer?.stats ?? WindowInstaller.Stats(moved: 0, copied: 0, fallbacks: 0, prefetched: 0, joined: 0,
                                                 stale: 0, failed: 0, bytes: 0)
    }

    /// Bytes of the served range backed by huge pages (its AnonHugePages), whichever path
    /// filled them.
    public func hugePageBytes() throws(UffdError) -> Int {
        try WindowInstaller.hugePageBytes(start: copyPath.inner.range.start, length: copyPath.inner.range.length)
    }
}
