import Synchronization

/// Resolves missing faults by moving pre-populated pages from a donor region (UFFDIO_MOVE,
/// zero-copy): granule `i` of the served range receives granule `i` of the donor. The granule
/// may be a base page or 2 MiB (THP moves: donor and range 2 MiB-aligned).
///
/// Each donor granule moves once. A granule dropped later (a remove or unmap event) is
/// zero-filled on its next fault, page by page. Follows remap events of the range (mremap):
/// granule `i` is still granule `i` at the new address. A second fault on a granule whose move is in
/// flight on another reader is only woken: it retries after the move.
///
/// The donor must be exclusive to this process (MOVE says EBUSY for shared pages): make it
/// with ``MappedRegion/donor(length:alignment:hugePages:)`` (MADV_DONTFORK).
public final class MovePolicy: FaultPolicy, @unchecked Sendable {
    /// The start of the served range (follows remaps).
    public var rangeStart: UInt { start.load(ordering: .relaxed) }
    private let start: Atomic<UInt>
    /// The length of the served range.
    public let rangeLength: Int
    /// The unit of one move.
    public let granule: Int
    /// The donor region's start.
    public let donorStart: UInt
    /// The donor region (kept alive).
    public let donor: MappedRegion
    // 0: not moved, 1: moved or moving, 2: dropped after the move (zero-fill).
    private let state: UnsafeMutablePointer<Atomic<UInt8>>
    private let granules: Int

    /// Serves `[start, start+length)` from `donor` (at least `length` bytes) in `granule` units.
    public init(start: UInt, length: Int, donor: MappedRegion, granule: Int = basePageSize) throws(UffdError) {
        guard donor.length >= length, granule > 0, length % granule == 0, Int(start) % granule == 0,
              Int(donor.address) % granule == 0 else {
            throw UffdError(.argument, .invalidArgument,
                            detail: "MovePolicy needs granule-aligned range and donor, donor >= range")
        }
        self.start = Atomic(start)
        rangeLength = length
        self.granule = granule
        self.donor = donor
        donorStart = donor.address
        granules = length / granule
        state = .allocate(capacity: granules)
        for i in 0..<granules { (state + i).initialize(to: Atomic(0)) }
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
        (0..<granules).reduce(0) { $0 + (state[$1].load(ordering: .relaxed) != 0 ? 1 : 0) }
    }

    /// Moves the faulting granule the first time; zero-fills dropped ones; wakes duplicates.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let rangeStart = self.rangeStart
        guard fault.address >= rangeStart, fault.address - rangeStart < UInt(rangeLength) else {
            throw outsideRange(fault, rangeStart, rangeLength)
        }
        if fault.kind == .writeProtect { return .unprotect() }
        let g = Int(fault.address - rangeStart) / granule
        let (exchanged, old) = state[g].compareExchange(expected: 0, desired: 1, ordering: .relaxed)
        if exchanged {
            let off = UInt(g * granule)
            return .move(from: donorStart + off, to: rangeStart + off, length: granule)
        }
        return old == 2 ? .zeropage() : .wake()
    }

    /// Follows a remap of the range; marks granules touched by a remove/unmap as dropped.
    public func handle(event: Event, context: borrowing FaultContext) {
        let rangeStart = self.rangeStart
        switch event {
        case .remap(let from, let to, _):
            _ = start.compareExchange(expected: from, desired: to, ordering: .relaxed)
        case .remove(let s, let e), .unmap(let s, let e):
            let lo = Swift.max(s, rangeStart), hi = Swift.min(e, rangeStart + UInt(rangeLength))
            guard lo < hi else { return }
            for g in Int(lo - rangeStart) / granule...Int(hi - 1 - rangeStart) / granule {
                _ = state[g].compareExchange(expected: 1, desired: 2, ordering: .relaxed)
            }
        default:
            break
        }
    }
}
