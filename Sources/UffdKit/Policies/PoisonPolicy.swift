import SystemPackage

/// Poisons selected pages (UFFDIO_POISON: accessing them raises SIGBUS, like a hardware
/// memory error) and lets another policy resolve the rest.
///
/// The pages are kept as logical pages of a ``ServedRange`` (by default the span from the first
/// to the last poisoned page), so they follow remap events of all or part of that span: a
/// poisoned page moved by `mremap` is still poisoned at its new address, and its old address
/// is no longer special.
public final class PoisonPolicy: FaultPolicy {
    /// The memory whose pages are chosen (follows remaps).
    public let range: ServedRange
    /// The poisoned pages, as logical page indexes of ``range``.
    public let pageIndexes: Set<Int>
    /// The page size of the memory.
    public let pageSize: Int
    /// The policy for every other page.
    public let otherwise: any FaultPolicy

    /// Poisons `pages` (any address inside each page) and resolves the rest with `otherwise`.
    /// The pages follow remaps of the span from the first to the last of them.
    public convenience init(pages: some Sequence<UInt>, pageSize: Int = basePageSize, otherwise: any FaultPolicy) {
        let aligned = Set(pages.map { $0 & ~UInt(pageSize - 1) })
        let lo = aligned.min() ?? 0, hi = aligned.max().map { $0 + UInt(pageSize) } ?? 0
        let range = ServedRange(start: lo, length: Int(hi - lo), pageSize: pageSize)
        self.init(range: range, pageIndexes: Set(aligned.map { Int($0 - lo) / pageSize }), otherwise: otherwise)
    }

    /// Poisons the logical pages `pageIndexes` of `range` (which follows remaps) and resolves
    /// the rest with `otherwise`.
    public init(range: ServedRange, pageIndexes: Set<Int>, otherwise: any FaultPolicy) {
        self.range = range
        self.pageSize = range.pageSize
        self.pageIndexes = pageIndexes
        self.otherwise = otherwise
    }

    /// The page-aligned addresses of the poisoned pages now (those unmapped since are left out).
    public var pages: Set<UInt> {
        Set(pageIndexes.compactMap { range.address(ofOffset: $0 * pageSize) })
    }

    /// Poison for the selected pages, the other policy's answer for the rest.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if fault.kind == .missing, let at = range.locate(fault.address), pageIndexes.contains(at.offset / pageSize) {
            return .poison(fault.address & ~UInt(pageSize - 1), length: pageSize)
        }
        return try otherwise.resolve(fault, context: context)
    }

    /// Follows a remap or unmap of (part of) the span; forwards the event.
    public func handle(event: Event, context: borrowing FaultContext) {
        range.follow(event)
        otherwise.handle(event: event, context: context)
    }

    /// Forwards failures.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        otherwise.failed(fault, resolution: resolution, errno: errno, context: context)
    }

    /// The same pages poisoned in the child (whose span moves on its own), over the other policy's child.
    public func forkedChild() -> any FaultPolicy {
        PoisonPolicy(range: range.copy(), pageIndexes: pageIndexes, otherwise: otherwise.forkedChild())
    }

    /// The other policy's scratch needs.
    public var scratchBytes: Int { otherwise.scratchBytes }
}
