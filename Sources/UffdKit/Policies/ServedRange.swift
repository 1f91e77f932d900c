import Synchronization

/// The memory a policy serves, as logical bytes `[0, length)` laid out at addresses that follow
/// the address space: an `mremap` of all or part of it (a REMAP event) moves that part, an
/// `munmap` (an UNMAP event) removes it. Every policy keeps its range here, so "which byte of
/// my image is this address" has one answer.
///
/// Lookups (``locate(_:)``, ``offset(of:)``, ``contains(_:)``) run on the fault path: one
/// acquiring load and a scan of the segments (one, until a partial remap splits the range), no
/// lock, no allocation. Changes (``follow(_:)``, ``remap(from:to:length:)``, ``unmap(start:end:)``)
/// are rare and run on the event path: they build a new segment table under a lock and publish
/// it; the old tables stay allocated until the range is released, so a reader still scanning
/// one never sees freed memory.
///
/// The range also remembers the addresses its bytes left (an unmapped part, the old place of a
/// remapped part): a fault read before such an event but decided after it is on memory that is
/// gone, not a routing mistake (``isGone(_:)``), and policies answer it with ``goneAnswer(_:)``.
public final class ServedRange: @unchecked Sendable {
    /// A contiguous piece of the range: logical bytes `[offset, offset+length)` at `start`.
    public struct Segment: Sendable, Hashable {
        /// The address of the piece's first byte.
        public var start: UInt
        /// The logical offset of that byte in the range.
        public var offset: Int
        /// Bytes in the piece (0 only in the table's terminator).
        public var length: Int
        /// The address after the piece's last byte.
        public var end: UInt { start &+ UInt(length) }
    }

    /// Where an address lies in the range.
    public struct Location: Sendable, Hashable {
        /// The logical offset of the address.
        public let offset: Int
        /// The start of the contiguous segment holding the address.
        public let segmentStart: UInt
        /// The end (exclusive) of the contiguous segment holding the address: a resolution
        /// starting at the address may not go past it.
        public let segmentEnd: UInt
    }

    /// The logical length (bytes served at the start, whatever has been unmapped since).
    public let length: Int
    /// The page size of the memory (the unit of ``pageIndex(of:)``).
    public let pageSize: Int
    /// The published table: segments sorted by offset, terminated by a segment of length 0.
    private let table: Atomic<UnsafeMutablePointer<Segment>>
    /// Every table ever published (freed on deinit); guards changes.
    private let tables: Mutex<[UnsafeMutablePointer<Segment>]>
    /// The published table of addresses the range's bytes left (unmapped, or remapped away),
    /// as segments (`offset` unused) sorted by address, terminated by a segment of length 0.
    /// Written under `tables`' lock; its old tables are kept in `tables` as well.
    private let left: Atomic<UnsafeMutablePointer<Segment>>

    /// A range of `length` bytes at `start`.
    public init(start: UInt, length: Int, pageSize: Int = basePageSize) {
        self.length = length
        self.pageSize = pageSize
        let first = ServedRange.makeTable(length > 0 ? [Segment(start: start, offset: 0, length: length)] : [])
        let noneLeft = ServedRange.makeTable([])
        table = Atomic(first)
        left = Atomic(noneLeft)
        tables = Mutex([first, noneLeft])
    }

    /// The range of a whole region.
    public convenience init(region: MappedRegion) {
        self.init(start: region.address, length: region.length, pageSize: region.pageSize)
    }

    /// A new range with the same layout and the same addresses left behind (a forked child's
    /// address space starts as a copy).
    public func copy() -> ServedRange {
        let r = ServedRange(start: 0, length: length, pageSize: pageSize)
        r.publish(segments)
        let gone = leftBehind
        if !gone.isEmpty {
            r.tables.withLock { all in
                let t = ServedRange.makeTable(gone)
                all.append(t)
                r.left.store(t, ordering: .releasing)
            }
        }
        return r
    }

    deinit {
        for t in tables.withLock({ $0 }) { t.deallocate() }
    }

    private static func makeTable(_ segs: [Segment]) -> UnsafeMutablePointer<Segment> {
        let p = UnsafeMutablePointer<Segment>.allocate(capacity: segs.count + 1)
        for (i, s) in segs.enumerated() { (p + i).initialize(to: s) }
        (p + segs.count).initialize(to: Segment(start: 0, offset: 0, length: 0))
        return p
    }

    // MARK: Fault path

    /// Where `address` lies, or nil when it is outside the range.
    @inline(__always)
    public func locate(_ address: UInt) -> Location? {
        var p = table.load(ordering: .acquiring)
        while p.pointee.length != 0 {
            let s = p.pointee
            let d = address &- s.start
            if address >= s.start && d < UInt(s.length) {
                return Location(offset: s.offset + Int(d), segmentStart: s.start, segmentEnd: s.end)
            }
            p += 1
        }
        return nil
    }

    /// Whether `address` is in the range.
    @inline(__always)
    public func contains(_ address: UInt) -> Bool { locate(address) != nil }

    /// Whether `address` held bytes of the range that were unmapped or remapped elsewhere since
    /// (and no part of the range lives there now): a fault there, read before the event and
    /// decided after it, is on memory that is gone. False for an address the range never
    /// covered (that is a routing or registration mistake).
    @inline(__always)
    public func isGone(_ address: UInt) -> Bool {
        if locate(address) != nil { return false }
        var p = left.load(ordering: .acquiring)
        while p.pointee.length != 0 {
            if address >= p.pointee.start && address &- p.pointee.start < UInt(p.pointee.length) { return true }
            p += 1
        }
        return false
    }

    /// The answer to a fault on memory that is gone (``isGone(_:)``): UFFDIO_ZEROPAGE on its
    /// page. The kernel finds no registered VMA there and says ENOENT, which the handler counts
    /// as `gone` and answers by waking the thread (whose retry then meets whatever is at the
    /// address now: SIGSEGV where nothing is). Not a bare wake: should the address have been
    /// mapped and registered on the same userfaultfd again since, the new memory gets a zero
    /// page (what fresh memory reads) instead of re-faulting onto this answer forever.
    @inline(__always)
    public func goneAnswer(_ fault: Fault) -> Resolution {
        .zeropage(fault.address & ~UInt(pageSize - 1), length: pageSize)
    }

    /// The address ranges the range's bytes left (unmapped, or remapped away), sorted by address.
    public var leftBehind: [Segment] {
        var out: [Segment] = []
        var p = left.load(ordering: .acquiring)
        while p.pointee.length != 0 { out.append(p.pointee); p += 1 }
        return out
    }

    /// The logical offset of `address`, or nil when it is outside the range.
    @inline(__always)
    public func offset(of address: UInt) -> Int? { locate(address)?.offset }

    /// The index of the page holding `address` (logical offset / page size), or nil.
    @inline(__always)
    public func pageIndex(of address: UInt) -> Int? { locate(address).map { $0.offset / pageSize } }

    /// The address where logical `offset` is mapped now, or nil when that part was unmapped.
    public func address(ofOffset offset: Int) -> UInt? {
        var p = table.load(ordering: .acquiring)
        while p.pointee.length != 0 {
            let s = p.pointee
            if offset >= s.offset && offset < s.offset + s.length { return s.start + UInt(offset - s.offset) }
            p += 1
        }
        return nil
    }

    /// The address of the first byte still served (that of offset 0 until a remap or unmap
    /// moves or removes it); 0 when everything was unmapped.
    public var start: UInt { table.load(ordering: .acquiring).pointee.start }

    /// The current segments, sorted by offset (one until a partial remap or unmap).
    public var segments: [Segment] {
        var out: [Segment] = []
        var p = table.load(ordering: .acquiring)
        while p.pointee.length != 0 { out.append(p.pointee); p += 1 }
        return out
    }

    /// The logical offsets of the served bytes among the addresses `[start, end)`, one range per
    /// segment they touch (event path: allocates).
    public func offsets(inAddresses start: UInt, _ end: UInt) -> [Range<Int>] {
        segments.compactMap { s in
            let lo = Swift.max(start, s.start), hi = Swift.min(end, s.end)
            guard lo < hi else { return nil }
            let o = s.offset + Int(lo - s.start)
            return o..<(o + Int(hi - lo))
        }
    }

    // MARK: Event path

    /// Follows a remap or an unmap event; true when the range changed.
    @discardableResult
    public func follow(_ event: Event) -> Bool {
        switch event {
        case .remap(let from, let to, let len): remap(from: from, to: to, length: len)
        case .unmap(let s, let e): unmap(start: s, end: e)
        default: false
        }
    }

    /// `mremap` moved `[from, from+length)` to `to`: the served bytes there now live at `to`
    /// (only that part: the rest stays). True when the range changed.
    @discardableResult
    public func remap(from: UInt, to: UInt, length len: Int) -> Bool {
        change { segs in
            let end = from &+ UInt(len)
            var out: [Segment] = []
            var changed = false
            for s in segs {
                let lo = Swift.max(from, s.start), hi = Swift.min(end, s.end)
                guard lo < hi else { out.append(s); continue }
                changed = true
                if s.start < lo { out.append(Segment(start: s.start, offset: s.offset, length: Int(lo - s.start))) }
                out.append(Segment(start: to + (lo - from), offset: s.offset + Int(lo - s.start), length: Int(hi - lo)))
                if hi < s.end { out.append(Segment(start: hi, offset: s.offset + Int(hi - s.start), length: Int(s.end - hi))) }
            }
            return changed ? out : nil
        }
    }

    /// `munmap` removed `[start, end)`: those bytes are no longer served. True when the range changed.
    @discardableResult
    public func unmap(start: UInt, end: UInt) -> Bool {
        change { segs in
            var out: [Segment] = []
            var changed = false
            for s in segs {
                let lo = Swift.max(start, s.start), hi = Swift.min(end, s.end)
                guard lo < hi else { out.append(s); continue }
                changed = true
                if s.start < lo { out.append(Segment(start: s.start, offset: s.offset, length: Int(lo - s.start))) }
                if hi < s.end { out.append(Segment(start: hi, offset: s.offset + Int(hi - s.start), length: Int(s.end - hi))) }
            }
            return changed ? out : nil
        }
    }

    /// Applies `edit` to the current segments under the lock and publishes the result (sorted
    /// by offset, neighbours that are contiguous in both address and offset merged). The
    /// addresses that held bytes before and hold none after join the left-behind table.
    private func change(_ edit: ([Segment]) -> [Segment]?) -> Bool {
        tables.withLock { all in
            let before = segments
            guard let edited = edit(before) else { return false }
            let after = ServedRange.normalized(edited)
            let served = after.map { $0.start..<$0.end }
            let vacated = ServedRange.subtract(before.map { $0.start..<$0.end }, served)
            let oldLeft = leftBehind.map { $0.start..<$0.end }
            let grown = ServedRange.merged(oldLeft + vacated)
            // What the range holds again (a part remapped back) is no longer left behind.
            let final = ServedRange.merged(ServedRange.subtract(grown, served))
            func publishLeft(_ ranges: [Range<UInt>]) {
                let l = ServedRange.makeTable(ranges.map { Segment(start: $0.lowerBound, offset: 0, length: Int($0.upperBound - $0.lowerBound)) })
                all.append(l)
                left.store(l, ordering: .releasing)
            }
            // Order matters to a reader that finds an address in no segment and then asks the
            // left-behind table: addresses vacated are published as left behind before the
            // segments lose them, and addresses served again are dropped from it only after
            // the segments gain them. So a reader that saw the new segments sees the new table.
            if grown != oldLeft { publishLeft(grown) }
            let t = ServedRange.makeTable(after)
            all.append(t)
            table.store(t, ordering: .releasing)
            if final != grown { publishLeft(final) }
            return true
        }
    }

    /// `a` without the addresses in `b`.
    private static func subtract(_ a: [Range<UInt>], _ b: [Range<UInt>]) -> [Range<UInt>] {
        var out = a
        for cut in b {
            out = out.flatMap { r -> [Range<UInt>] in
                guard r.overlaps(cut) else { return [r] }
                var pieces: [Range<UInt>] = []
                if r.lowerBound < cut.lowerBound { pieces.append(r.lowerBound..<cut.lowerBound) }
                if cut.upperBound < r.upperBound { pieces.append(cut.upperBound..<r.upperBound) }
                return pieces
            }
        }
        return out
    }

    /// Sorted by start, overlapping or touching ranges joined.
    private static func merged(_ a: [Range<UInt>]) -> [Range<UInt>] {
        var out: [Range<UInt>] = []
        for r in a.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<Swift.max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    private func publish(_ segs: [Segment]) {
        tables.withLock { all in
            let t = ServedRange.makeTable(ServedRange.normalized(segs))
            all.append(t)
            table.store(t, ordering: .releasing)
        }
    }

    private static func normalized(_ segs: [Segment]) -> [Segment] {
        var out: [Segment] = []
        for s in segs.sorted(by: { $0.offset < $1.offset }) where s.length > 0 {
            if let last = out.last, last.end == s.start, last.offset + last.length == s.offset {
                out[out.count - 1].length += s.length
            } else {
                out.append(s)
            }
        }
        return out
    }
}

extension ServedRange: CustomStringConvertible {
    /// The segments as `address+length@offset`.
    public var description: String {
        let s = segments
        if s.isEmpty { return "(unmapped, \(length) bytes)" }
        return s.map { "\(hex($0.start))+\($0.length)@\($0.offset)" }.joined(separator: ", ")
    }
}

/// A fault outside the memory a policy serves (a routing or registration mistake).
func outsideRange(_ fault: Fault, _ range: ServedRange) -> UffdError {
    UffdError(.argument, .badAddress, detail: "fault at \(hex(fault.address)) outside the policy's range \(range)")
}

/// The answer to a fault the range does not hold: gone (``ServedRange/goneAnswer(_:)``) where
/// the range's bytes were unmapped or remapped away, else an error (outside the range).
@inline(never)
func goneOrOutside(_ fault: Fault, _ range: ServedRange) throws(UffdError) -> Resolution {
    guard range.isGone(fault.address) else { throw outsideRange(fault, range) }
    return range.goneAnswer(fault)
}
