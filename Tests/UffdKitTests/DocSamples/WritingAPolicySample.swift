import UffdKit

// --- doc begin writing-a-policy
/// Fills every page of its range with the page's index (one `UInt64` repeated), built in the
/// reader's scratch memory and copied in with UFFDIO_COPY.
final class PageIndexPolicy: FaultPolicy {
    let start: UInt
    let length: Int

    init(start: UInt, length: Int) {
        self.start = start
        self.length = length
    }

    /// One page of scratch per fault: the handler allocates it once per reader, up front.
    var scratchBytes: Int { basePageSize }

    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        // Not ours: the handler's fallback resolves it and reports the failure.
        guard fault.address >= start, fault.address < start + UInt(length),
              let scratch = context.scratch else { return .fail }
        let index = UInt64((fault.address - start) / UInt(basePageSize))
        let words = scratch.assumingMemoryBound(to: UInt64.self)
        for i in 0..<basePageSize / 8 { words[i] = index }
        return .copy(from: UInt(bitPattern: scratch), to: fault.address, length: basePageSize)
    }
}
// --- doc end

enum WritingAPolicySample {
    static func run() throws -> [UInt64] {
        // --- doc begin writing-a-policy-use
        let region = try MappedRegion(.anonymous(), length: 64 * basePageSize)
        let uffd = try Userfaultfd()
        try uffd.register(region.address, length: region.length, modes: .missing)
        let handler = FaultHandler(uffd: uffd, policy: PageIndexPolicy(start: region.address, length: region.length))
        try handler.start()
        defer { handler.stop() }

        let words = region.pointer.assumingMemoryBound(to: UInt64.self)
        let pageIndexes = [0, 5, 63].map { words[$0 * basePageSize / 8] }   // [0, 5, 63]
        // --- doc end
        return pageIndexes
    }
}
