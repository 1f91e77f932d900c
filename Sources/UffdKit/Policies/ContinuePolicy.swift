/// Resolves minor faults on shmem/hugetlb (UFFDIO_CONTINUE): the page is already in the page
/// cache, it only needs mapping. An optional hook sees (and may edit) the page-cache page
/// through the region's alias view before it is mapped.
public final class ContinuePolicy: FaultPolicy {
    /// Called before mapping: the page through the alias view, its offset in the region, its length.
    public typealias Prepare = @Sendable (_ page: UnsafeMutableRawPointer, _ offset: Int, _ length: Int) throws -> Void

    /// The start of the served range.
    public let rangeStart: UInt
    /// The length of the served range.
    public let rangeLength: Int
    /// The page size (the huge page size for hugetlb).
    public let pageSize: Int
    private let aliasStart: UInt
    private let prepare: Prepare?

    /// Serves a shmem or hugetlb region; `prepare` runs on each page before it is mapped.
    public init(region: MappedRegion, prepare: Prepare? = nil) throws(UffdError) {
        guard let alias = region.alias else {
            throw UffdError(.argument, .invalidArgument, detail: "ContinuePolicy needs shmem or hugetlb memory (an alias view)")
        }
        rangeStart = region.address
        rangeLength = region.length
        pageSize = region.pageSize
        aliasStart = UInt(bitPattern: alias)
        self.prepare = prepare
    }

    /// Runs the hook on the page, then continues it. Missing faults (a page not in the page
    /// cache, when also registered for MISSING) are an error: the fallback applies.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard fault.address >= rangeStart, fault.address - rangeStart < UInt(rangeLength) else {
            throw outsideRange(fault, rangeStart, rangeLength)
        }
        let page = fault.address & ~UInt(pageSize - 1)
        switch fault.kind {
        case .minor:
            if let prepare {
                let off = Int(page - rangeStart)
                try prepare(UnsafeMutableRawPointer(bitPattern: aliasStart + UInt(off))!, off, pageSize)
            }
            return .continue(page, length: pageSize)
        case .writeProtect:
            return .unprotect(page, length: pageSize)
        case .missing:
            throw UffdError(.continue, .noSuchFileOrDirectory, detail: "missing fault at \(hex(fault.address)): no page-cache page to continue")
        }
    }
}
