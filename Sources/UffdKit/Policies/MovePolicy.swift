import SystemPackage
import Synchronization

/// Resolves missing faults by moving pre-populated pages from a donor region (UFFDIO_MOVE,
/// zero-copy): granule `i` of the served range receives granule `i` of the donor. The granule
/// may be a base page or 2 MiB (THP moves: donor and range 2 MiB-aligned).
///
/// Each donor granule moves once. A granule dropped later (a remove or unmap event) is
/// zero-filled on its next fault, page by page. Follows remap events of all or part of the range
/// (``ServedRange``): granule `i` is still granule `i` at its new address. A second fault on a
/// granule whose move is in flight on another reader is only woken: it retries after the move.
///
/// A move that fails (its ioctl's error, reported through ``failed(_:resolution:errno:context:)``)
/// marks its granule "not moved" again: the handler's fallback resolved the fault, and with the
/// `.wake` fallback the next fault on the granule tries the move again instead of being woken
/// forever. A move that meets EAGAIN (an event such as REMOVE or FORK is pending) is reported
/// the same way, errno EAGAIN, before the handler decides the kept fault again: the new
/// decision moves the granule instead of seeing its own "moving" mark and only waking.
///
/// A huge granule's move may fail part-way: with the donor in base pages the kernel moves page
/// after page and stops at the first it cannot move (a hole: ENOENT; a shared page: EBUSY),
/// leaving the pages before it moved. The granule is then "partly moved", and each later fault
/// on it moves its own base page: what was moved stays (a whole move again would meet the first
/// moved page, EEXIST, and only wake: the thread would re-fault forever), what can still be
/// moved is moved, and only a page that cannot be gets the handler's fallback (a move of the
/// rest of the granule would hand its fallback the donor pages after a hole as well).
///
/// A forked child (``forkedChild()``) has no donor (MADV_DONTFORK keeps it out of the child),
/// so nothing can be moved into it: its faults on the range are errors, resolved by the child
/// handler's fallback (default: SIGBUS in the child), and never touch this policy's state.
///
/// The donor must be exclusive to this process (MOVE says EBUSY for shared pages): make it
/// with ``MappedRegion/donor(length:alignment:hugePages:)`` (MADV_DONTFORK).
public final class MovePolicy: FaultPolicy, @unchecked Sendable {
    /// The memory served (follows remaps).
    public let range: ServedRange
    /// The unit of one move.
    public let granule: Int
    /// The donor region's start.
    public let donorStart: UInt
    /// The donor region (kept alive).
    public let donor: MappedRegion
    // Per granule: notMoved, moving (the move was decided, its outcome not known yet: a failure
    // resets it), dropped after the move (zero-fill), or partly moved (a huge granule's move
    // failed part-way: base pages move one by one).
    private static let notMoved: UInt8 = 0, moved: UInt8 = 1, dropped: UInt8 = 2, partial: UInt8 = 3
    private let state: UnsafeMutablePointer<Atomic<UInt8>>
    private let granules: Int

    /// Serves `[start, start+length)` from `donor` (at least `length` bytes) in `granule` units.
    public init(start: UInt, length: Int, donor: MappedRegion, granule: Int = basePageSize) throws(UffdError) {
        guard donor.length >= length, granule > 0, length % granule == 0, Int(start) % granule == 0,
              Int(donor.address) % granule == 0 else {
            throw UffdError(.argument, .invalidArgument,
                            detail: "MovePolicy needs granule-aligned range and donor, donor >= range")
        }
        range = ServedRange(start: start, length: length, pageSize: granule)
        self.granule = granule
        self.donor = donor
        donorStart = donor.address
        granules = length / granule
        state = .allocate(capacity: granules)
        for i in 0..<granules { (state + i).initialize(to: Atomic(MovePolicy.notMoved)) }
    }

    /// Serves a whole region.
    public convenience init(region: MappedRegion, donor: MappedRegion, granule: Int = basePageSize) throws(UffdError) {
        try self.init(start: region.address, length: region.length, donor: donor, granule: granule)
    }

    deinit {
        _ = state.deinitialize(count: granules)
        state.deallocate()
    }

    /// How many granules were moved (or are moving).
    public var movedGranules: Int {
        (0..<granules).reduce(0) { $0 + (state[$1].load(ordering: .relaxed) != MovePolicy.notMoved ? 1 : 0) }
    }

    /// Moves the faulting granule the first time; zero-fills dropped ones; moves the faulting base
    /// page of a partly moved one; wakes duplicates; answers memory that is gone (unmapped).
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard let at = range.locate(fault.address) else {
            // Gone: the faulting base page only (the granule may be a huge one, and a zeropage
            // meeting a populated page first would only wake).
            guard range.isGone(fault.address) else { throw outsideRange(fault, range) }
            return .zeropage()
        }
        if fault.kind == .writeProtect { return .unprotect() }
        let g = at.offset / granule
        let inGranule = at.offset - g * granule
        let dst = fault.address - UInt(inGranule)
        let (exchanged, old) = state[g].compareExchange(expected: MovePolicy.notMoved, desired: MovePolicy.moved,
                                                        ordering: .relaxed)
        if exchanged {
            guard dst >= at.segmentStart, dst + UInt(granule) <= at.segmentEnd else {
                // A partial remap split this granule: it cannot move as one piece.
                state[g].store(MovePolicy.notMoved, ordering: .relaxed)
                throw UffdError(.move, .invalidArgument,
                                detail: "granule \(g) at \(hex(dst)) was split by a partial remap; it cannot be moved whole")
            }
            return .move(from: donorStart + UInt(g * granule), to: dst, length: granule)
        }
        switch old {
        case MovePolicy.dropped: return .zeropage()
        case MovePolicy.partial:
            // The faulting base page was not moved (it faulted): move it alone.
            let page = fault.address & ~UInt(basePageSize - 1)
            return .move(from: donorStart + UInt(at.offset - Int(fault.address - page)), to: page, length: basePageSize)
        default: return .wake()
        }
    }

    /// A move that did not happen: a base-page granule is "not moved" again, so the next fault
    /// on it moves it (the donor still holds it) instead of being woken forever. A huge
    /// granule's move may have moved the pages before the one it stopped at: the granule is
    /// "partly moved", its later faults move their own base page.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        guard resolution.operation == .move, let at = range.locate(resolution.start) else { return }
        _ = state[at.offset / granule].compareExchange(
            expected: MovePolicy.moved, desired: resolution.length > basePageSize ? MovePolicy.partial : MovePolicy.notMoved,
            ordering: .relaxed)
    }

    /// Follows a remap of (part of) the range; marks granules touched by a remove/unmap as dropped.
    public func handle(event: Event, context: borrowing FaultContext) {
        switch event {
        case .remap:
            range.follow(event)
        case .remove(let s, let e), .unmap(let s, let e):
            for offsets in range.offsets(inAddresses: s, e) {
                for g in offsets.lowerBound / granule...(offsets.upperBound - 1) / granule {
                    _ = state[g].compareExchange(expected: MovePolicy.moved, desired: MovePolicy.dropped, ordering: .relaxed)
                }
            }
            range.follow(event)
        default:
            break
        }
    }

    /// A forked child has no donor: its faults on the range are errors (the child handler's
    /// fallback resolves them) and never change this policy's granules.
    public func forkedChild() -> any FaultPolicy { NoDonorInChild(range: range.copy()) }

    private final class NoDonorInChild: FaultPolicy {
        let range: ServedRange
        init(range: ServedRange) { self.range = range }
        func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
            if fault.kind == .writeProtect { return .unprotect() }
            throw UffdError(.move, .noSuchFileOrDirectory,
                            detail: "fault at \(hex(fault.address)) in a forked child: the donor is not in the child (MADV_DONTFORK), nothing can be moved there")
        }
        func handle(event: Event, context: borrowing FaultContext) { range.follow(event) }
    }
}
