/// Resolves minor faults on shmem/hugetlb (UFFDIO_CONTINUE): the page is already in the page
/// cache, it only needs mapping. An optional hook sees (and may edit) the page-cache page
/// through the region's alias view before it is mapped.
///
/// Works on shared shmem, hugetlb and private shmem (`MappedRegion.Kind.shmemPrivate`): there
/// the page cache is filled through the shared alias view and CONTINUE maps its page into the
/// private view read-only; the first write to it copies it (private to this mapping), so the
/// page cache, and the alias, keep the original bytes. Follows remap events of all or part of
/// the registered view: the page at logical offset `o` is always the alias's page `o`.
public final class ContinuePolicy: FaultPolicy {
    /// Called before mapping: the page through the alias view, its offset in the region, its length.
    public typealias Prepare = @Sendable (_ page: UnsafeMutableRawPointer, _ offset: Int, _ length: Int) throws -> Void

    /// The registered view served (follows remaps).
    public let range: ServedRange
    /// The page size (the huge page size for hugetlb).
    public let pageSize: Int
    private let aliasStart: UInt
    private let prepare: Prepare?

    /// Serves `range`, whose page cache is seen at `alias`; `prepare` runs on each page before
    /// it is mapped.
    public init(range: ServedRange, alias: UnsafeMutableRawPointer, prepare: Prepare? = nil) {
        self.range = range
        pageSize = range.pageSize
        aliasStart = UInt(bitPattern: alias)
        self.prepare = prepare
    }

    /// Serves a shmem, private shmem or hugetlb region; `prepare` runs on each page before it is mapped.
    public convenience init(region: MappedRegion, prepare: Prepare? = nil) throws(UffdError) {
        guard let alias = region.alias else {
            throw UffdError(.argument, .invalidArgument, detail: "ContinuePolicy needs shmem, shmem-private or hugetlb memory (an alias view)")
        }
        self.init(range: ServedRange(region: region), alias: alias, prepare: prepare)
    }

    /// Runs the hook on the page, then continues it. Missing faults (a page not in the page
    /// cache, when also registered for MISSING) are an error: the fallback applies.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard let at = range.locate(fault.address) else { return try goneOrOutside(fault, range) }
        let page = fault.address & ~UInt(pageSize - 1)
        switch fault.kind {
        case .minor:
            if let prepare {
                let off = at.offset - Int(fault.address - page)
                try prepare(UnsafeMutableRawPointer(bitPattern: aliasStart + UInt(off))!, off, pageSize)
            }
            return .continue(page, length: pageSize)
        case .writeProtect:
            return .unprotect(page, length: pageSize)
        case .missing:
            throw UffdError(.continue, .noSuchFileOrDirectory, detail: "missing fault at \(hex(fault.address)): no page-cache page to continue")
        }
    }

    /// Follows a remap or unmap of (part of) the registered view.
    public func handle(event: Event, context: borrowing FaultContext) { range.follow(event) }

    /// The same page cache for the child, whose view moves on its own.
    public func forkedChild() -> any FaultPolicy {
        ContinuePolicy(range: range.copy(), alias: UnsafeMutableRawPointer(bitPattern: aliasStart)!, prepare: prepare)
    }
}
