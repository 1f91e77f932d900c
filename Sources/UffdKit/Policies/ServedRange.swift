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

    /// A range of `length` bytes at `start`.
    public init(start: UInt, length: Int, pageSize: Int = basePageSize) {
        self.length = length
        self.pageSize = pageSize
        let first = ServedRange.makeTable(length > 0 ? [Segment(start: start, offset: 0, length: length)] : [])
        table = Atomic(first)
        tables = Mutex([first])
    }

    /// The range of a whole region.
    public convenience init(region: MappedRegion) {
        self.init(start: region.address, length: region.length, pageSize: region.pageSize)
    }

    /// A new range with the same layout (a forked child's address space starts as a copy).
    public func copy() -> ServedRange {
        let r = ServedRange(start: 0, length: length, pageSize: pageSize)
        r.publish(segments)
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
    /// by offset, neighbours that are contiguous in both address and offset merged).
    private func change(_ edit: ([Segment]) -> [Segment]?) -> Bool {
        tables.withLock { all in
            guard let edited = edit(segments) else { return false }
            let t = ServedRange.makeTable(ServedRange.normalized(edited))
            all.append(t)
            table.store(t, ordering: .releasing)
            return true
        }
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
