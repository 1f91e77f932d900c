import CUffd
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Installs a lazily loaded image into registered memory a whole window (2 MiB) at a time, at
/// the speed of memory (the C core's `cuffd_installer`): the window's bytes are read once into a
/// private donor backed by a transparent huge page and moved into place with UFFDIO_MOVE, so no
/// byte is copied twice and the memory ends up backed by huge pages. Prefetch threads install
/// the windows ahead of a sequential stream while the faulting threads read, so reading and
/// installing overlap.
///
/// The reusable fast path: ``InstallPolicy`` calls it from the fault path; a background filler
/// (prefetch) calls ``prefetch(window:)`` for the windows it wants in; both may run at once, a
/// window is installed once. Same process only (MOVE needs donor and destination in one address
/// space); `mode: .copy` copies from the donor instead (destination not THP-eligible, THP off,
/// shmem): one copy still, no huge pages.
///
/// Outcomes: a move that fails (EBUSY, ENOENT, EEXIST, a VMA boundary inside the window) is
/// completed by UFFDIO_COPY from the donor for that window, page by page past pages that exist or
/// cannot be reached, without losing data; a fault on a window another thread installs returns
/// at once (that install wakes the window whatever happens); EAGAIN (an event is unread) wakes
/// the window and the threads re-fault after the event was read; a source error or another ioctl
/// error is thrown: the caller resolves the faulting page (the handler's fallback).
///
/// Lifetime: the prefetch threads use the uffd's fd number; call ``stopPrefetching()`` (or let
/// the installer go) before ``Userfaultfd/close()``, or a reused fd number could receive their
/// ioctls.
public final class WindowInstaller: @unchecked Sendable {
    /// How windows are installed.
    public enum Mode: Sendable, Hashable {
        /// UFFDIO_MOVE of a huge-page donor (copy fallback per window).
        case move
        /// UFFDIO_COPY from the donor.
        case copy
    }

    /// Counters (all windows, all threads).
    public struct Stats: Sendable, Hashable {
        /// Windows installed whole by UFFDIO_MOVE.
        public var moved: Int
        /// Windows installed by UFFDIO_COPY (copy mode or a failed move's fallback).
        public var copied: Int
        /// Moves that failed and were completed by COPY.
        public var fallbacks: Int
        /// Windows installed by the prefetch threads (or ``prefetch(window:)``).
        public var prefetched: Int
        /// Faults on a window another thread was installing.
        public var joined: Int
        /// Faults on a window already installed (a page dropped since, or a fault that raced
        /// the install): that one page was copied.
        public var stale: Int
        /// Installs that failed (source or ioctl error).
        public var failed: Int
        /// Bytes installed (moved or copied; pages found in place are not counted).
        public var bytes: Int
        /// Nanoseconds the installing threads spent populating donors (zeroed huge pages),
        /// reading the image into them, and moving/copying them into place.
        public var allocNs: UInt64 = 0, fillNs: UInt64 = 0, placeNs: UInt64 = 0
    }

    /// First byte the installer serves (a multiple of ``window``).
    public let start: UInt
    /// Bytes served.
    public let length: Int
    /// Bytes per window.
    public let window: Int
    /// How windows are installed.
    public let mode: Mode
    /// The image.
    public let source: any PageSource
    /// The userfaultfd the range is registered on (kept alive).
    public let uffd: Userfaultfd
    private let raw: OpaquePointer
    private let box: Unmanaged<FillBox>

    private final class FillBox {
        let source: any PageSource
        let file: FileSource?
        let sourceOffset: Int
        init(source: any PageSource, sourceOffset: Int) {
            self.source = source
            self.file = source as? FileSource
            self.sourceOffset = sourceOffset
        }
    }

    /// Serves `[start, start+length)` (registered MISSING on `uffd`, in this process) from
    /// `source` bytes `sourceOffset...`.
    /// - Parameters:
    ///   - uffd: the userfaultfd the range is registered on (MISSING).
    ///   - start: the first byte served, a multiple of `window`.
    ///   - length: bytes served, a multiple of the base page (the last window may be partial:
    ///     it is copied, not moved).
    ///   - source: the image; a ``FileSource`` is read with pread straight into the donor.
    ///   - sourceOffset: the image offset of `start`.
    ///   - mode: `.move` (THP donor moved whole) or `.copy` (copied from the donor).
    ///   - window: bytes per window, a power of two (default 2 MiB, the PMD size: MOVE moves a
    ///     huge page whole).
    ///   - prefetchThreads: threads (dedicated pthreads) installing windows ahead of a
    ///     sequential stream, 0...4.
    ///   - ahead: windows a stream is prefetched ahead.
    ///   - prefetchCPUs: CPU of each prefetch thread (missing: not pinned).
    public init(uffd: Userfaultfd, start: UInt, length: Int, source: any PageSource, sourceOffset: Int = 0,
                mode: Mode = .move, window: Int = 2 << 20, prefetchThreads: Int = 0, ahead: Int = 8,
                prefetchCPUs: [Int32] = []) throws(UffdError) {
        guard window > 0, window & (window - 1) == 0, Int(start) % window == 0, length > 0,
              length % basePageSize == 0, (0...4).contains(prefetchThreads) else {
            throw UffdError(.argument, .invalidArgument,
                            detail: "WindowInstaller needs a power-of-two window dividing the start, a page-multiple length and 0...4 prefetch threads")
        }
        self.start = start
        self.length = length
        self.window = window
        self.mode = mode
        self.source = source
        self.uffd = uffd
        let box = Unmanaged.passRetained(FillBox(source: source, sourceOffset: sourceOffset))
        var cfg = cuffd_installer_config()
        cfg.uffd = uffd.fd
        cfg.start = UInt64(start)
        cfg.len = UInt64(length)
        cfg.window = UInt64(window)
        cfg.fill = { ctx, offset, dst, len in
            guard let ctx, let dst else { return -EINVAL }
            let b = Unmanaged<FillBox>.fromOpaque(ctx).takeUnretainedValue()
            let at = b.sourceOffset + Int(offset), n = Int(len)
            do {
                if let f = b.file {
                    try f.read(into: dst, at: at, count: n) // pread straight into the donor
                } else {
                    let p = try b.source.bytes(at: at, count: n, scratch: dst)
                    if p != UnsafeRawPointer(dst) { dst.copyMemory(from: p, byteCount: n) }
                }
                return 0
            } catch let e as UffdError {
                return -e.errno.rawValue
            } catch {
                return -EIO
            }
        }
        cfg.ctx = UnsafeMutableRawPointer(box.toOpaque())
        cfg.flags = mode == .copy ? UInt32(CUFFD_INSTALL_COPY.rawValue) : 0
        cfg.fillers = UInt32(prefetchThreads)
        cfg.ahead = UInt32(Swift.max(1, ahead))
        cfg.filler_cpus = (-1, -1, -1, -1)
        withUnsafeMutableBytes(of: &cfg.filler_cpus) { b in
            let cpus = b.bindMemory(to: Int32.self)
            for (i, c) in prefetchCPUs.prefix(4).enumerated() { cpus[i] = c }
        }
        var out: OpaquePointer?
        let rc = cuffd_installer_create(&cfg, &out)
        guard rc == 0, let out else {
            box.release()
            throw UffdError(.map, rc: rc, detail: "window installer: \(length) bytes, window \(window)")
        }
        raw = out
        self.box = box
    }

    deinit {
        cuffd_installer_destroy(raw)
        box.release()
    }

    /// Whether `address` is served here.
    @inlinable
    public func contains(_ address: UInt) -> Bool { address >= start && address - start < UInt(length) }

    /// Installs the window holding `faultAddress` (unless it is in or going in), waking the
    /// faulting thread. Called on the fault path; no allocation.
    /// - Throws: ``UffdError`` when the page could not be resolved (source error, ioctl error):
    ///   the caller resolves it (the handler's fallback).
    public func install(faultAddress: UInt) throws(UffdError) {
        let rc = cuffd_installer_install(raw, UInt64(faultAddress))
        if rc < 0 {
            throw UffdError(mode == .move ? .move : .copy, rc: rc,
                            detail: "installing the window of \(hex(faultAddress))")
        }
    }

    /// Installs window `index` (bytes `index*window ..< (index+1)*window` of the range) without
    /// a fault: a background filler's step. Returns false when it was already in (or going in).
    @discardableResult
    public func prefetch(window index: Int) throws(UffdError) -> Bool {
        let rc = cuffd_installer_prefetch(raw, UInt64(index))
        if rc < 0 { throw UffdError(mode == .move ? .move : .copy, rc: rc, detail: "prefetching window \(index)") }
        return rc == 0
    }

    /// The number of windows.
    public var windows: Int { (length + window - 1) / window }

    /// Marks the windows overlapping `[start, start+length)` not installed (after REMOVE or
    /// UNMAP): a later fault installs them again (by COPY where pages remain).
    public func forget(_ start: UInt, length: Int) {
        cuffd_installer_forget(raw, UInt64(start), UInt64(length))
    }

    /// Stops and joins the prefetch threads (installs on the fault path keep working).
    public func stopPrefetching() { cuffd_installer_stop(raw) }

    /// The counters so far. An install adds to them after its ioctl woke the faulting threads:
    /// for final totals read them once the installing threads are done (the handler stopped,
    /// ``stopPrefetching()`` returned).
    public var stats: Stats {
        var s = cuffd_installer_stats()
        cuffd_installer_stats(raw, &s)
        return Stats(moved: Int(s.moved), copied: Int(s.copied), fallbacks: Int(s.fallbacks),
                     prefetched: Int(s.prefetched), joined: Int(s.joined), stale: Int(s.stale),
                     failed: Int(s.failed), bytes: Int(s.bytes), allocNs: s.alloc_ns, fillNs: s.fill_ns,
                     placeNs: s.place_ns)
    }

    /// Bytes of the served range backed by huge pages now (its "AnonHugePages").
    public func hugePageBytes() throws(UffdError) -> Int {
        try WindowInstaller.hugePageBytes(start: start, length: length)
    }

    /// Bytes of `[start, start+length)` of this process mapped by huge pages (transparent huge
    /// pages and hugetlb): ``HugePageCoverage/measure(start:length:)``'s `hugePageBytes`.
    public static func hugePageBytes(start: UInt, length: Int) throws(UffdError) -> Int {
        try HugePageCoverage.measure(start: start, length: length).hugePageBytes
    }

    /// Whether THP can back the anonymous memory at `address` now: THP enabled for this process
    /// (`/sys/kernel/mm/transparent_hugepage/enabled`, `PR_GET_THP_DISABLE`) and the VMA not
    /// `MADV_NOHUGEPAGE` (and `MADV_HUGEPAGE` when the setting is `madvise`).
    public static func thpEligible(_ address: UInt) -> Bool { cuffd_thp_eligible(UInt64(address)) == 1 }
}
