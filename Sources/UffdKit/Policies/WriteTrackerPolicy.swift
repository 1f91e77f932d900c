import CUffd
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Tracks writes to populated memory with synchronous write-protect faults: ``arm(_:)``
/// write-protects the range; the first write to each page faults, is logged in a dirty bitmap,
/// and the page is unprotected. In snapshot mode the page is copied to the snapshot buffer
/// *before* it is unprotected (copy-before-write), so the snapshot holds the contents at arm time.
///
/// For tracking without a fault per page see ``AsyncWriteTracker`` (WP_ASYNC + PAGEMAP_SCAN).
/// Register the range with `.writeProtect` on a fd opened with ``Features/pagefaultFlagWP``.
public final class WriteTrackerPolicy: FaultPolicy, @unchecked Sendable {
    /// The tracked range (follows remaps: page `i` is the range's page `i` wherever it lives).
    public let range: ServedRange
    /// The page size.
    public let pageSize: Int
    /// Where snapshot mode saves pages (same layout as the range), nil when only logging.
    public let snapshot: UnsafeMutableRawPointer?
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let wordCount: Int
    private let pageCount: Int

    /// Tracks `[start, start+length)`; with `snapshot` (at least `length` bytes), saves each
    /// page there before its first write.
    public convenience init(start: UInt, length: Int, pageSize: Int = basePageSize, snapshot: UnsafeMutableRawPointer? = nil) {
        self.init(range: ServedRange(start: start, length: length, pageSize: pageSize), snapshot: snapshot)
    }

    /// Tracks `range`; with `snapshot` (at least `range.length` bytes), saves each page there
    /// before its first write.
    public init(range: ServedRange, snapshot: UnsafeMutableRawPointer? = nil) {
        self.range = range
        self.pageSize = range.pageSize
        self.snapshot = snapshot
        pageCount = range.length / pageSize
        wordCount = (pageCount + 63) / 64
        words = .allocate(capacity: Swift.max(1, wordCount))
        for i in 0..<Swift.max(1, wordCount) { (words + i).initialize(to: Atomic(0)) }
    }

    /// Tracks a whole region.
    public convenience init(region: MappedRegion, snapshot: UnsafeMutableRawPointer? = nil) {
        self.init(range: ServedRange(region: region), snapshot: snapshot)
    }

    deinit {
        _ = words.deinitialize(count: Swift.max(1, wordCount))
        words.deallocate()
    }

    /// Clears the log and write-protects the range on `uffd` (start of a tracking interval).
    /// In snapshot mode, pages not written later are not copied: the caller's snapshot must
    /// hold them, or read them from the range (unchanged pages are identical).
    public func arm(_ uffd: Userfaultfd) throws(UffdError) {
        for i in 0..<wordCount { words[i].store(0, ordering: .relaxed) }
        for s in range.segments { try uffd.writeProtect(s.start, length: s.length) }
    }

    /// Logs the page (saving it first in snapshot mode) and unprotects it.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard let at = range.locate(fault.address) else { return try goneOrOutside(fault, range) }
        let idx = at.offset / pageSize
        let page = fault.address & ~UInt(pageSize - 1)
        guard fault.kind == .writeProtect else { return .zeropage(page, length: pageSize) }
        let bit: UInt64 = 1 << UInt64(idx & 63)
        if let snapshot, words[idx >> 6].load(ordering: .acquiring) & bit == 0 {
            // The page cannot change while it is protected: reads are allowed, writes wait.
            memcpy(snapshot + idx * pageSize, UnsafeRawPointer(bitPattern: page)!, pageSize)
        }
        words[idx >> 6].bitwiseOr(bit, ordering: .releasing)
        return .unprotect(page, length: pageSize)
    }

    /// Follows a remap or unmap of (part of) the range.
    public func handle(event: Event, context: borrowing FaultContext) { range.follow(event) }

    /// A forked child's writes are not this range's: the child's tracker unprotects its pages
    /// and logs them apart (no snapshot: the handler could only read the parent's memory).
    public func forkedChild() -> any FaultPolicy { WriteTrackerPolicy(range: range.copy()) }

    /// Whether page `index` (from the start of the range) was written since ``arm(_:)``.
    public func isDirty(page index: Int) -> Bool {
        words[index >> 6].load(ordering: .acquiring) & (1 << UInt64(index & 63)) != 0
    }

    /// The indexes of the pages written since ``arm(_:)``.
    public func dirtyPages() -> [Int] {
        var out: [Int] = []
        for w in 0..<wordCount {
            var bits = words[w].load(ordering: .acquiring)
            while bits != 0 {
                let b = bits.trailingZeroBitCount
                out.append(w * 64 + b)
                bits &= bits - 1
            }
        }
        return out
    }
}

/// Dirty tracking without faults: the fd is opened with WP_ASYNC, so the kernel resolves
/// write-protect faults itself and marks the pages written; ``collect(reprotect:)`` reads and
/// (optionally) re-protects them atomically with PAGEMAP_SCAN. No handler thread is needed.
public final class AsyncWriteTracker: @unchecked Sendable {
    /// The userfaultfd (WP_ASYNC) the range is registered with.
    public let uffd: Userfaultfd
    /// The tracked range. The fd asks for no REMAP events (no handler would read them), so the
    /// kernel unregisters memory that mremap moves: after moving part of the range, drop it with
    /// ``ServedRange/unmap(start:end:)`` (its old addresses), and ``collect(reprotect:)`` scans the rest.
    public let range: ServedRange
    private let pagemap: Int32

    /// Opens a WP_ASYNC userfaultfd, registers `[start, start+length)` for write-protect and
    /// protects it.
    /// - Throws: ``UffdError`` (`.api` when WP_ASYNC is not offered, `.register`, `.writeProtect`).
    public init(start: UInt, length: Int) throws(UffdError) {
        uffd = try Userfaultfd(features: [.wpAsync, .wpUnpopulated, .pagefaultFlagWP])
        try uffd.register(start, length: length, modes: .writeProtect)
        try uffd.writeProtect(start, length: length)
        let pm = cuffd_pagemap_open()
        guard pm >= 0 else { throw UffdError(.pagemapScan, rc: pm, detail: "open /proc/self/pagemap") }
        pagemap = pm
        range = ServedRange(start: start, length: length)
    }

    /// Tracks a whole region.
    public convenience init(region: MappedRegion) throws(UffdError) {
        try self.init(start: region.address, length: region.length)
    }

    deinit { close(pagemap) }

    /// The byte ranges written since the last protect (sorted, merged by the kernel), and,
    /// with `reprotect`, protects them again in the same walk.
    public func collect(reprotect: Bool = true) throws(UffdError) -> [Range<UInt>] {
        var out: [Range<UInt>] = []
        var vec = [page_region](repeating: page_region(), count: 512)
        for s in range.segments { try collect(UInt64(s.start), UInt64(s.end), reprotect: reprotect, into: &out, &vec) }
        return out
    }

    private func collect(_ start: UInt64, _ end: UInt64, reprotect: Bool, into out: inout [Range<UInt>],
                         _ vec: inout [page_region]) throws(UffdError) {
        var at = start
        while at < end {
            var walkEnd: UInt64 = 0
            let n = vec.withUnsafeMutableBufferPointer {
                cuffd_pagemap_scan_written(pagemap, at, end, reprotect, $0.baseAddress, $0.count, &walkEnd)
            }
            guard n >= 0 else { throw UffdError(.pagemapScan, rc: n, detail: "\(hex(UInt(at)))..\(hex(UInt(end)))") }
            for i in 0..<Int(n) { out.append(UInt(vec[i].start)..<UInt(vec[i].end)) }
            if walkEnd <= at { break }
            at = walkEnd
        }
    }

    /// The number of written pages since the last protect (re-protecting them).
    public func collectPageCount(reprotect: Bool = true) throws(UffdError) -> Int {
        try collect(reprotect: reprotect).reduce(0) { $0 + Int($1.upperBound - $1.lowerBound) / basePageSize }
    }
}
