import Synchronization

/// Resolves missing faults with zero pages (UFFDIO_ZEROPAGE): what the kernel would do, but
/// observable. Write-protect faults are unprotected, minor faults continued.
public final class ZeroFillPolicy: RangeFillingPolicy {
    private let start: Atomic<UInt>
    /// The length of the memory served.
    public let rangeLength: Int
    /// The page size of the memory served.
    public let pageSize: Int

    /// Serves `[start, start+length)` with pages of `pageSize`.
    public init(start: UInt, length: Int, pageSize: Int = basePageSize) {
        self.start = Atomic(start)
        self.rangeLength = length
        self.pageSize = pageSize
    }

    /// Serves a whole region.
    public convenience init(region: MappedRegion) {
        self.init(start: region.address, length: region.length, pageSize: region.pageSize)
    }

    /// The start of the memory served (follows remaps).
    public var rangeStart: UInt { start.load(ordering: .relaxed) }

    /// A zero page for missing faults; unprotect / continue for the others.
    @inlinable
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let page = fault.address & ~UInt(pageSize - 1)
        switch fault.kind {
        case .missing: return .zeropage(page, length: pageSize)
        case .writeProtect: return .unprotect(page, length: pageSize)
        case .minor: return .continue(page, length: pageSize)
        }
    }

    /// UFFDIO_ZEROPAGE on the range.
    public func fill(_ start: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution {
        .zeropage(start, length: length)
    }

    /// Follows a remap of the served range.
    public func handle(event: Event, context: borrowing FaultContext) {
        if case .remap(let from, let to, _) = event { _ = start.compareExchange(expected: from, desired: to, ordering: .relaxed) }
    }
}
