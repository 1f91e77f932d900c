import Synchronization

/// Widens the resolutions of a ``RangeFillingPolicy`` (copy or zero-fill) to a window of pages
/// starting at the faulting page, clipped to the served range. Pages of the window that are
/// already populated stop the ioctl with EEXIST, which the loop counts as done.
///
/// The adaptive window doubles while faults are sequential (each one right after the previous
/// window) and drops back to the minimum on a random access. With several readers the
/// heuristic state is shared (relaxed atomics): a race only mis-sizes one window.
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
    private let nextExpected = Atomic<UInt>(0)
    private let current: Atomic<Int>

    /// Wraps `inner` with `window`.
    public init(_ inner: Inner, window: Window) {
        self.inner = inner
        self.window = window
        switch window {
        case .fixed(let n): minPages = Swift.max(1, n); maxPages = minPages
        case .adaptive(let lo, let hi): minPages = Swift.max(1, lo); maxPages = Swift.max(minPages, hi)
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
        let base = inner.rangeStart
        let end = base + UInt(inner.rangeLength)
        guard page >= base, page < end else { throw outsideRange(fault, base, inner.rangeLength) }
        var pages = minPages
        if minPages != maxPages {
            let expected = nextExpected.load(ordering: .relaxed)
            let w = current.load(ordering: .relaxed)
            // Sequential: the fault is inside or right after the previous window.
            if page == expected || (page > expected &- UInt(w * ps) && page < expected) {
                pages = Swift.min(maxPages, w * 2)
            }
            current.store(pages, ordering: .relaxed)
        }
        let length = Swift.min(UInt(pages * ps), end - page)
        nextExpected.store(page + length, ordering: .relaxed)
        return try inner.fill(page, length: Int(length), context: context)
    }

    /// Forwards events to the wrapped policy.
    public func handle(event: Event, context: borrowing FaultContext) {
        inner.handle(event: event, context: context)
    }
}
