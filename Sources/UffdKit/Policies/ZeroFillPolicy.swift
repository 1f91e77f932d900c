/// Resolves missing faults with zeros, as the kernel would, but observable: UFFDIO_ZEROPAGE on
/// anonymous and shmem memory; on hugetlb, which has no UFFDIO_ZEROPAGE (EINVAL), UFFDIO_COPY
/// from a shared read-only huge page of zeros (``ZeroSource``). Write-protect faults are
/// unprotected, minor faults continued. Follows remap events of all or part of the range.
///
/// Naming: `zeropage` is the ioctl (``Resolution/zeropage(_:length:)``); zero-fill is the
/// outcome (the page reads as zeros), whichever ioctl gives it.
public final class ZeroFillPolicy: RangeFillingPolicy {
    /// The memory served (follows remaps).
    public let range: ServedRange
    /// The page size of the memory served.
    public let pageSize: Int
    /// Whether zeros are copied (hugetlb) instead of mapped with UFFDIO_ZEROPAGE.
    public let copiesZeros: Bool
    /// The zeros copied when ``copiesZeros`` (0 otherwise).
    private let zeros: UInt
    private let zerosLength: Int

    /// Serves `range`; `hugetlb`: copy zeros (hugetlb has no UFFDIO_ZEROPAGE).
    public init(range: ServedRange, hugetlb: Bool = false) {
        self.range = range
        self.pageSize = range.pageSize
        let z = hugetlb ? ZeroSource(length: range.length) : nil
        copiesZeros = hugetlb
        zeros = z?.zeros.map { UInt(bitPattern: $0) } ?? 0
        zerosLength = z?.zerosLength ?? 0
    }

    /// Serves `[start, start+length)` with pages of `pageSize`; `hugetlb`: copy zeros.
    public convenience init(start: UInt, length: Int, pageSize: Int = basePageSize, hugetlb: Bool = false) {
        self.init(range: ServedRange(start: start, length: length, pageSize: pageSize), hugetlb: hugetlb)
    }

    /// Serves a whole region (zeros are copied when it is hugetlb).
    public convenience init(region: MappedRegion) {
        self.init(range: ServedRange(region: region), hugetlb: region.kind.isHugetlb)
    }

    /// Zeros for missing faults; unprotect / continue for the others.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let page = fault.address & ~UInt(pageSize - 1)
        switch fault.kind {
        case .missing: return try fill(page, length: pageSize, context: context)
        case .writeProtect: return .unprotect(page, length: pageSize)
        case .minor: return .continue(page, length: pageSize)
        }
    }

    /// Zeros on `[start, start+length)`: UFFDIO_ZEROPAGE, or on hugetlb a COPY from the shared
    /// zeros (at most their length: a longer window is cut there).
    @inline(__always)
    public func fill(_ start: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution {
        guard copiesZeros else { return .zeropage(start, length: length) }
        guard zeros != 0 else {
            throw UffdError(.source, .noMemory, detail: "no shared zeros to copy (mmap of a zero huge page failed)")
        }
        return .copy(from: zeros, to: start, length: Swift.min(length, zerosLength))
    }

    /// Follows a remap or unmap of (part of) the served range.
    public func handle(event: Event, context: borrowing FaultContext) { range.follow(event) }

    /// A zero-fill policy for the child, whose range moves on its own.
    public func forkedChild() -> any FaultPolicy { ZeroFillPolicy(range: range.copy(), hugetlb: copiesZeros) }
}
