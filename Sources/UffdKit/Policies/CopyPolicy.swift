#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Resolves missing faults by copying the page from a ``PageSource`` (UFFDIO_COPY): lazy
/// loading of a snapshot, a file, or generated contents. Offset 0 of the source is the start
/// of the served range. Follows remap events of all or part of the range (``ServedRange``).
public final class CopyPolicy: RangeFillingPolicy {
    /// The memory served (follows remaps).
    public let range: ServedRange
    /// The page size of the memory served (the unit of one resolution).
    public let pageSize: Int
    /// Where the bytes come from.
    public let source: any PageSource
    /// Map the copied pages write-protected (UFFDIO_COPY_MODE_WP), for tracking writes later.
    public let writeProtected: Bool
    /// The source as a ``ZeroAwarePageSource`` (cast once here, not per fault).
    private let zeroAware: (any ZeroAwarePageSource)?

    /// Serves `range` from `source`.
    public init(range: ServedRange, source: any PageSource, writeProtected: Bool = false) {
        self.range = range
        self.source = source
        self.pageSize = range.pageSize
        self.writeProtected = writeProtected
        self.zeroAware = source as? any ZeroAwarePageSource
    }

    /// Serves `[start, start+length)` from `source`.
    public convenience init(start: UInt, length: Int, source: any PageSource, pageSize: Int = basePageSize, writeProtected: Bool = false) {
        self.init(range: ServedRange(start: start, length: length, pageSize: pageSize), source: source,
                  writeProtected: writeProtected)
    }

    /// Serves a whole region from `source`.
    public convenience init(region: MappedRegion, source: any PageSource, writeProtected: Bool = false) {
        self.init(range: ServedRange(region: region), source: source, writeProtected: writeProtected)
    }

    /// One page per fault (see ``ReadaheadPolicy`` for more).
    public var scratchBytes: Int { pageSize }

    /// Copies the faulting page from the source.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard let at = range.locate(fault.address) else { return try goneOrOutside(fault, range) }
        let page = fault.address & ~UInt(pageSize - 1)
        if fault.kind == .writeProtect { return .unprotect(page, length: pageSize) }
        let offset = at.offset - Int(fault.address - page)
        if let zero = zeroResolution(page, offset: offset, length: pageSize, context: context) { return zero }
        let p = try source.bytes(at: offset, count: pageSize, scratch: context.scratch)
        return .copy(from: UInt(bitPattern: p), to: page, length: pageSize, writeProtected: writeProtected)
    }

    /// For a source that knows `[offset, offset+length)` is all zeros (a packed snapshot's zero
    /// chunks): ZEROPAGE, or a COPY of zeros where there is no zero page (hugetlb) or the copy
    /// must be write-protected. nil: read the bytes.
    @inline(__always)
    private func zeroResolution(_ page: UInt, offset: Int, length: Int, context: borrowing FaultContext) -> Resolution? {
        guard let zeroAware, zeroAware.isZero(at: offset, count: length) else { return nil }
        if pageSize == basePageSize && !writeProtected { return .zeropage(page, length: length) }
        guard let scratch = context.scratch else { return nil }
        memset(scratch, 0, length)
        return .copy(from: UInt(bitPattern: scratch), to: page, length: length, writeProtected: writeProtected)
    }

    /// Copies `[start, start+length)` from the source's matching offset.
    public func fill(_ page: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution {
        guard let offset = range.offset(of: page) else {
            throw UffdError(.argument, .badAddress, detail: "fill at \(hex(page)) outside the policy's range \(range)")
        }
        if let zero = zeroResolution(page, offset: offset, length: length, context: context) { return zero }
        let p = try source.bytes(at: offset, count: length, scratch: context.scratch)
        return .copy(from: UInt(bitPattern: p), to: page, length: length, writeProtected: writeProtected)
    }

    /// Follows a remap or unmap of (part of) the served range.
    public func handle(event: Event, context: borrowing FaultContext) { range.follow(event) }

    /// A copy policy over the same source for the child, whose range moves on its own.
    public func forkedChild() -> any FaultPolicy {
        CopyPolicy(range: range.copy(), source: source, writeProtected: writeProtected)
    }
}
