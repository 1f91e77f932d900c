import Synchronization
import SystemPackage

/// Widens the resolutions of a ``RangeFillingPolicy`` (copy or zero-fill) to a window of pages
/// starting at the faulting page, clipped to the served range. Pages of the window that are
/// already populated stop the ioctl with EEXIST, which the loop counts as done.
///
/// The adaptive window doubles while faults are sequential (each one inside or right after the
/// window of an earlier fault) and starts again at the minimum on a random access. Like the
/// kernel's file readahead it follows several streams at once: up to ``streamSlots`` sequential
/// readers (threads walking their own parts of the range) each grow their own window instead of
/// resetting one shared window. The state is relaxed atomics: a race only mis-sizes one window.
public final class ReadaheadPolicy<Inner: RangeFillingPolicy>: FaultPolicy {
    /// How many pages one fault resolves.
    public enum Window: Sendable, Hashable {
        /// Always this many pages.
        case fixed(pages: Int)
        /// Between `minPages` and `maxPages`, growing while sequential.
        case adaptive(minPages: Int, maxPages: Int)
    }

    /// The wrapped policy.
    public let inner: Inner
    /// The window rule.
    public let window: Window
    private let minPages: Int
    private let maxPages: Int
    private let current: Atomic<Int>
    /// Streams followed at once by the adaptive window.
    public static var streamSlots: Int { 8 }
    /// Per stream: (the page number where its next window starts << 16) | its window in pages;
    /// 0 = unused. Packed so one atomic word holds a stream.
    private let streams = InlineArray<8, Atomic<UInt64>> { _ in Atomic(0) }
    /// Round-robin victim for a new stream.
    private let nextSlot = Atomic<Int>(0)

    /// Wraps `inner` with `window`.
    public init(_ inner: Inner, window: Window) {
        self.inner = inner
        self.window = window
        switch window {
        case .fixed(let n): minPages = Swift.max(1, n); maxPages = minPages
        case .adaptive(let lo, let hi):
            minPages = Swift.min(Swift.max(1, lo), 0x8000)
            maxPages = Swift.min(Swift.max(minPages, hi), 0x8000)
        }
        current = Atomic(minPages)
    }

    /// The largest window, in bytes.
    public var scratchBytes: Int { maxPages * inner.pageSize }

    /// The current adaptive window in pages (for observation).
    public var currentWindowPages: Int { current.load(ordering: .relaxed) }

    /// Resolves the faulting page and the pages after it (window), clipped to the range.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard fault.kind == .missing else { return try inner.resolve(fault, context: context) }
        let ps = inner.pageSize
        let page = fault.address & ~UInt(ps - 1)
        // The window stays inside the segment holding the page: after a partial remap the
        // next logical page may live elsewhere.
        guard let at = inner.range.locate(page) else { return try goneOrOutside(fault, inner.range) }
        let end = at.segmentEnd
        var pages = minPages
        var slot = -1
        let shift = UInt64(ps.trailingZeroBitCount)
        if minPages != maxPages {
            let pageNumber = UInt64(page) >> shift
            for i in 0..<Self.streamSlots {
                let v = streams[i].load(ordering: .relaxed)
                guard v != 0 else { continue }
                let expected = v >> 16, w = v & 0xFFFF
                // Sequential: the fault is inside or right after that stream's last window.
                if pageNumber == expected || (pageNumber < expected && pageNumber + w >= expected) {
                    slot = i
                    pages = Swift.min(maxPages, Int(w) * 2)
                    break
                }
            }
            if slot < 0 {
                slot = nextSlot.wrappingAdd(1, ordering: .relaxed).oldValue & (Self.streamSlots - 1)
            }
        }
        let length = Swift.min(UInt(pages * ps), end - page)
        if slot >= 0 {
            let next = (UInt64(page + length) >> shift) << 16 | UInt64(Swift.min(pages, 0xFFFF))
            streams[slot].store(next, ordering: .relaxed)
            current.store(pages, ordering: .relaxed)
        }
        return try inner.fill(page, length: Int(length), context: context)
    }

    /// Forwards events to the wrapped policy.
    public func handle(event: Event, context: borrowing FaultContext) {
        inner.handle(event: event, context: context)
    }

    /// Forwards failures to the wrapped policy.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        inner.failed(fault, resolution: resolution, errno: errno, context: context)
    }

    /// The same window over the wrapped policy's child (streams start afresh).
    public func forkedChild() -> any FaultPolicy {
        guard let child = inner.forkedChild() as? Inner else { return self }
        return ReadaheadPolicy(child, window: window)
    }
}
