import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Resolves missing faults by copying the page from a ``PageSource`` (UFFDIO_COPY): lazy
/// loading of a snapshot, a file, or generated contents. Offset 0 of the source is the start
/// of the served range. Follows remap events of the range.
public final class CopyPolicy: RangeFillingPolicy {
    private let start: Atomic<UInt>
    /// The length of the memory served.
    public let rangeLength: Int
    /// The page size of the memory served (the unit of one resolution).
    public let pageSize: Int
    /// Where the bytes come from.
    public let source: any PageSource
    /// Map the copied pages write-protected (UFFDIO_COPY_MODE_WP), for tracking writes later.
    public let writeProtected: Bool
    /// The source as a ``ZeroAwarePageSource`` (cast once here, not per fault).
    private let zeroAware: (any ZeroAwarePageSource)?

    /// Serves `[start, start+length)` from `source`.
    public init(start: UInt, length: Int, source: any PageSource, pageSize: Int = basePageSize, writeProtected: Bool = false) {
        self.start = Atomic(start)
        self.rangeLength = length
        self.source = source
        self.pageSize = pageSize
        self.writeProtected = writeProtected
        self.zeroAware = source as? any ZeroAwarePageSource
    }

    /// Serves a whole region from `source`.
    public convenience init(region: MappedRegion, source: any PageSource, writeProtected: Bool = false) {
        self.init(start: region.address, length: region.length, source: source, pageSize: region.pageSize,
                  writeProtected: writeProtected)
    }

    /// The start of the memory served (follows remaps).
    public var rangeStart: UInt { start.load(ordering: .relaxed) }

    /// One page per fault (see ``ReadaheadPolicy`` for more).
    public var scratchBytes: Int { pageSize }

    /// Copies the faulting page from the source.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let base = start.load(ordering: .relaxed)
        guard fault.address >= base, fault.address - base < UInt(rangeLength) else {
            throw outsideRange(fault, base, rangeLength)
        }
        if fault.kind == .writeProtect { return .unprotect(fault.address & ~UInt(pageSize - 1), length: pageSize) }
        return try fill(fault.address & ~UInt(pageSize - 1), length: pageSize, context: context)
    }

    /// Copies `[start, start+length)` from the source's matching offset.
    public func fill(_ page: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution {
        let offset = Int(page &- start.load(ordering: .relaxed))
        if let zeroAware, zeroAware.isZero(at: offset, count: length) {
            // Known zeros (a packed snapshot's zero chunks): nothing to read. hugetlb has no
            // zero page: a COPY of zeros there.
            if pageSize == basePageSize && !writeProtected { return .zeropage(page, length: length) }
            if let scratch = context.scratch {
                memset(scratch, 0, length)
                return .copy(from: UInt(bitPattern: scratch), to: page, length: length, writeProtected: writeProtected)
            }
        }
        let p = try source.bytes(at: offset, count: length, scratch: context.scratch)
        return .copy(from: UInt(bitPattern: p), to: page, length: length, writeProtected: writeProtected)
    }

    /// Follows a remap of the served range.
    public func handle(event: Event, context: borrowing FaultContext) {
        if case .remap(let from, let to, _) = event { _ = start.compareExchange(expected: from, desired: to, ordering: .relaxed) }
    }
}
