import SystemPackage

/// Poisons selected pages (UFFDIO_POISON: accessing them raises SIGBUS, like a hardware
/// memory error) and lets another policy resolve the rest.
public final class PoisonPolicy: FaultPolicy {
    /// Page-aligned addresses to poison.
    public let pages: Set<UInt>
    /// The page size of the memory.
    public let pageSize: Int
    /// The policy for every other page.
    public let otherwise: any FaultPolicy

    /// Poisons `pages` (any address inside each page) and resolves the rest with `otherwise`.
    public init(pages: some Sequence<UInt>, pageSize: Int = basePageSize, otherwise: any FaultPolicy) {
        self.pageSize = pageSize
        self.pages = Set(pages.map { $0 & ~UInt(pageSize - 1) })
        self.otherwise = otherwise
    }

    /// Poison for the selected pages, the other policy's answer for the rest.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let page = fault.address & ~UInt(pageSize - 1)
        if fault.kind == .missing, pages.contains(page) { return .poison(page, length: pageSize) }
        return try otherwise.resolve(fault, context: context)
    }

    /// Forwards events.
    public func handle(event: Event, context: borrowing FaultContext) { otherwise.handle(event: event, context: context) }

    /// Forwards failures.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        otherwise.failed(fault, resolution: resolution, errno: errno, context: context)
    }

    /// The same pages poisoned, over the other policy's child.
    public func forkedChild() -> any FaultPolicy {
        PoisonPolicy(pages: pages, pageSize: pageSize, otherwise: otherwise.forkedChild())
    }

    /// The other policy's scratch needs.
    public var scratchBytes: Int { otherwise.scratchBytes }
}
