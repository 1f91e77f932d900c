import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The pages a restored process touched, in the order of their first faults, with the time of
/// each since the start: recorded on one restore (``WorkingSetTracker`` with ``WorkingSetPolicy``), prefetched on the
/// next (``Prefetcher``). Several recordings merge into one (``merged(_:minCount:)``) that keeps
/// the pages seen in every run (or in at least K), ordered by average position.
///
/// A recording names the image it was made from (``Identity``: its size and a digest of sampled
/// chunks), so prefetching from an image that changed since is an error at start
/// (``check(against:servedLength:)``), never wrong memory.
///
/// File format (little-endian), version 1:
/// `"UFFDWSET"`, u32 version, u32 page size, u64 image size, u64 image digest, u32 runs merged,
/// u32 reserved (0), u64 entry count, entries of (u64 byte offset, u64 nanoseconds since start),
/// u64 FNV-1a checksum of everything before it.
public struct WorkingSet: Sendable, Hashable {
    /// The version this library writes and reads.
    public static let formatVersion: UInt32 = 1
    static let magic: [UInt8] = Array("UFFDWSET".utf8)
    static let headerBytes = 8 + 4 + 4 + 8 + 8 + 4 + 4 + 8

    /// Which image a recording belongs to: its size and a digest of sampled chunks (the first and
    /// last 64 KiB and 16 evenly spaced 4 KiB pieces), so a different or rewritten image is
    /// noticed without reading all of it. A change that touches no sampled byte goes unnoticed.
    public struct Identity: Sendable, Hashable, CustomStringConvertible {
        /// The image size in bytes.
        public var size: Int
        /// FNV-1a over the sampled chunks and the size.
        public var digest: UInt64

        /// An identity with known values.
        public init(size: Int, digest: UInt64) {
            self.size = size
            self.digest = digest
        }

        /// Reads the samples from `source` (one read per sample, through the source's own path).
        /// - Throws: the source's error when a sample cannot be read.
        public init(of source: any PageSource) throws {
            let size = source.length
            let edge = 64 << 10, piece = 4096
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: edge, alignment: 4096)
            defer { scratch.deallocate() }
            var h = fnvOffset
            withUnsafeBytes(of: UInt64(size).littleEndian) { h = fnv1a($0, h) }
            func sample(_ offset: Int, _ count: Int) throws {
                let n = Swift.max(0, Swift.min(count, size - offset))
                guard n > 0 else { return }
                let p = try source.bytes(at: offset, count: n, scratch: scratch)
                h = fnv1a(UnsafeRawBufferPointer(start: p, count: n), h)
            }
            try sample(0, edge)
            if size > edge { try sample(Swift.max(edge, size - edge), edge) }
            for i in 1...16 {
                let at = (size / 17 * i) & ~(piece - 1)
                try sample(at, piece)
            }
            self.init(size: size, digest: h)
        }

        /// Size and digest in hex.
        public var description: String { "\(size) bytes, digest \(String(digest, radix: 16))" }
    }

    /// One recorded page.
    public struct Entry: Sendable, Hashable {
        /// Byte offset of the page in the image (a multiple of the page size).
        public var offset: Int
        /// Nanoseconds from the start of the recording to the page's first fault.
        public var nanoseconds: UInt64

        /// An entry.
        public init(offset: Int, nanoseconds: UInt64) {
            self.offset = offset
            self.nanoseconds = nanoseconds
        }
    }

    /// The image the pages belong to.
    public var identity: Identity
    /// The page size of the recording (the unit of the entries).
    public var pageSize: Int
    /// Recordings merged into this one (1 for a plain recording).
    public var runs: Int
    /// The pages in first-fault order (each page once).
    public var entries: [Entry]

    /// A working set; entries must be distinct, page-aligned offsets inside the image.
    public init(identity: Identity, pageSize: Int, runs: Int = 1, entries: [Entry]) {
        self.identity = identity
        self.pageSize = pageSize
        self.runs = runs
        self.entries = entries
    }

    /// Bytes the recorded pages cover.
    public var bytes: Int { entries.count * pageSize }

    // MARK: Validation

    /// Checks that this recording was made from the image `identity` names and that every page
    /// lies inside the `servedLength` bytes that will be prefetched into.
    /// - Throws: ``UffdError`` `.argument` naming what does not match and what to do.
    public func check(against identity: Identity, servedLength: Int) throws(UffdError) {
        if identity.size != self.identity.size {
            throw UffdError(.argument, .invalidArgument, detail:
                "working set was recorded from an image of \(self.identity.size) bytes, this image has \(identity.size) bytes: record it again")
        }
        if identity.digest != self.identity.digest {
            throw UffdError(.argument, .invalidArgument, detail:
                "working set was recorded from another version of this image (digest \(String(self.identity.digest, radix: 16)), now \(String(identity.digest, radix: 16))): record it again")
        }
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
            throw UffdError(.argument, .invalidArgument, detail: "working set page size \(pageSize) is not a power of two")
        }
        for e in entries where e.offset < 0 || e.offset % pageSize != 0 || e.offset >= servedLength {
            throw UffdError(.argument, .invalidArgument, detail:
                "working set page at offset \(e.offset) lies past the end of the \(servedLength) bytes served (or is unaligned): record it again")
        }
    }

    /// The page offsets in order for memory of `pageSize` (a recording of 4 KiB pages used on
    /// 2 MiB hugetlb memory names each huge page once, at its first recorded base page; a
    /// recording of larger pages is split into pages of `pageSize`).
    public func offsets(forPageSize target: Int) -> [Int] {
        if target == pageSize { return entries.map(\.offset) }
        var out: [Int] = []
        out.reserveCapacity(entries.count)
        if target > pageSize {
            var seen = Set<Int>()
            for e in entries {
                let o = e.offset & ~(target - 1)
                if seen.insert(o).inserted { out.append(o) }
            }
        } else {
            for e in entries {
                for o in stride(from: e.offset, to: e.offset + pageSize, by: target) { out.append(o) }
            }
        }
        return out
    }

    // MARK: Merge

    /// Merges recordings of one image: keeps the pages seen in at least `minCount` of them
    /// (default: all), ordered by their average position (rank) in the recordings they appear
    /// in; times are averaged the same way. Ties keep the order of the first recording.
    /// - Throws: ``UffdError`` `.argument` when the inputs name different images or page
    ///   sizes, or `minCount` is outside 1...inputs.
    public static func merged(_ sets: [WorkingSet], minCount: Int? = nil) throws(UffdError) -> WorkingSet {
        guard let first = sets.first else {
            throw UffdError(.argument, .invalidArgument, detail: "merge needs at least one working set")
        }
        let k = minCount ?? sets.count
        guard k >= 1, k <= sets.count else {
            throw UffdError(.argument, .invalidArgument, detail: "--min \(k): must be 1...\(sets.count) (the number of inputs)")
        }
        for (i, s) in sets.enumerated() {
            if s.identity != first.identity {
                throw UffdError(.argument, .invalidArgument, detail:
                    "input \(i + 1) was recorded from another image (\(s.identity)) than input 1 (\(first.identity))")
            }
            if s.pageSize != first.pageSize {
                throw UffdError(.argument, .invalidArgument, detail:
                    "input \(i + 1) has \(s.pageSize)-byte pages, input 1 has \(first.pageSize)-byte pages")
            }
        }
        struct Acc { var count = 0; var rankSum = 0.0; var timeSum = 0.0; var firstSeen = Int.max }
        var acc: [Int: Acc] = [:]
        var order = 0
        for s in sets {
            for (rank, e) in s.entries.enumerated() {
                var a = acc[e.offset] ?? Acc()
                a.count += 1
                a.rankSum += Double(rank)
                a.timeSum += Double(e.nanoseconds)
                if a.firstSeen == Int.max { a.firstSeen = order; order += 1 }
                acc[e.offset] = a
            }
        }
        let kept = acc.filter { $0.value.count >= k }.map { (offset: $0.key, acc: $0.value) }
            .sorted { l, r in
                let la = l.acc.rankSum / Double(l.acc.count), ra = r.acc.rankSum / Double(r.acc.count)
                return la != ra ? la < ra : l.acc.firstSeen < r.acc.firstSeen
            }
        return WorkingSet(identity: first.identity, pageSize: first.pageSize, runs: sets.reduce(0) { $0 + $1.runs },
                          entries: kept.map { Entry(offset: $0.offset, nanoseconds: UInt64($0.acc.timeSum / Double($0.acc.count))) })
    }

    /// The recordings of the regions of one image made in one run (one tracker per region, clocks
    /// started together), as one recording: every page, in the order of the first-fault times.
    /// - Throws: ``UffdError`` `.argument` when the parts name different images or page sizes,
    ///   or a page appears in two parts (overlapping regions).
    public static func combined(_ parts: [WorkingSet]) throws(UffdError) -> WorkingSet {
        guard let first = parts.first else {
            throw UffdError(.argument, .invalidArgument, detail: "combining needs at least one recording")
        }
        var all: [Entry] = []
        for p in parts {
            guard p.identity == first.identity, p.pageSize == first.pageSize else {
                throw UffdError(.argument, .invalidArgument, detail: "recordings of different images or page sizes cannot be combined")
            }
            all += p.entries
        }
        guard Set(all.map(\.offset)).count == all.count else {
            throw UffdError(.argument, .invalidArgument, detail: "a page appears in two recordings: the regions overlap")
        }
        // A stable sort keeps each region's own order for equal times.
        let sorted = all.enumerated().sorted { $0.element.nanoseconds != $1.element.nanoseconds
            ? $0.element.nanoseconds < $1.element.nanoseconds : $0.offset < $1.offset }.map(\.element)
        return WorkingSet(identity: first.identity, pageSize: first.pageSize, runs: first.runs, entries: sorted)
    }

    // MARK: Summary

    /// What `working-set info` shows.
    public struct Summary: Sendable, Hashable {
        /// Pages recorded.
        public var pages: Int
        /// Bytes they cover.
        public var bytes: Int
        /// The share of the image they cover (0...1).
        public var coverage: Double
        /// Runs of pages adjacent in both order and image (one ioctl each when prefetched).
        public var contiguousRuns: Int
        /// Nanoseconds from the start to the last page's first fault.
        public var lastNanoseconds: UInt64
        /// The lowest recorded offset.
        public var lowestOffset: Int
        /// The highest recorded offset.
        public var highestOffset: Int
    }

    /// Counts, coverage and contiguity.
    public var summary: Summary {
        var runs = 0
        var prev = Int.min
        for e in entries {
            if prev == Int.min || e.offset != prev + pageSize { runs += 1 }
            prev = e.offset
        }
        return Summary(pages: entries.count, bytes: bytes,
                       coverage: identity.size > 0 ? Double(bytes) / Double(identity.size) : 0,
                       contiguousRuns: runs, lastNanoseconds: entries.map(\.nanoseconds).max() ?? 0,
                       lowestOffset: entries.map(\.offset).min() ?? 0, highestOffset: entries.map(\.offset).max() ?? 0)
    }

    // MARK: Encoding

    /// The file's bytes.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.headerBytes + entries.count * 16 + 8)
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        out.append(contentsOf: Self.magic)
        put(Self.formatVersion)
        put(UInt32(pageSize))
        put(UInt64(identity.size))
        put(identity.digest)
        put(UInt32(clamping: runs))
        put(UInt32(0))
        put(UInt64(entries.count))
        for e in entries {
            put(UInt64(e.offset))
            put(e.nanoseconds)
        }
        let sum = out.withUnsafeBytes { fnv1a($0, fnvOffset) }
        put(sum)
        return out
    }

    /// Decodes a file's bytes.
    /// - Throws: ``UffdError`` `.argument` saying what is wrong (not a working set, a newer
    ///   version, truncated, corrupt, duplicate or unaligned pages).
    public init(decoding bytes: [UInt8], name: String = "working set") throws(UffdError) {
        func bad(_ why: String) -> UffdError {
            UffdError(.argument, .invalidArgument, detail: "\(name): \(why)")
        }
        guard bytes.count >= 8, Array(bytes[0..<8]) == Self.magic else {
            throw bad("not a working-set file (no UFFDWSET header): record one with --record-working-set")
        }
        guard bytes.count >= Self.headerBytes + 8 else { throw bad("truncated (\(bytes.count) bytes)") }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { d in bytes.withUnsafeBytes { d.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<at + MemoryLayout<T>.size])) } }
            return T(littleEndian: v)
        }
        let version = get(8, UInt32.self)
        guard version == Self.formatVersion else {
            throw bad("format version \(version), this uffdctl reads version \(Self.formatVersion): use a matching uffdctl or record again")
        }
        let pageSize = Int(get(12, UInt32.self))
        let size = get(16, UInt64.self), digest = get(24, UInt64.self)
        let runs = Int(get(32, UInt32.self))
        let count = get(40, UInt64.self)
        guard count <= UInt64(bytes.count), Self.headerBytes + Int(count) * 16 + 8 == bytes.count else {
            throw bad("truncated or padded: \(count) entries need \(Self.headerBytes + Int(min(count, 1 << 40)) * 16 + 8) bytes, the file has \(bytes.count)")
        }
        let stored = get(bytes.count - 8, UInt64.self)
        let sum = bytes.withUnsafeBytes { fnv1a(UnsafeRawBufferPointer(rebasing: $0[0..<bytes.count - 8]), fnvOffset) }
        guard stored == sum else { throw bad("checksum mismatch: the file is corrupt") }
        guard pageSize > 0, pageSize & (pageSize - 1) == 0, size <= UInt64(Int.max) else {
            throw bad("page size \(pageSize) or image size \(size) is invalid")
        }
        var entries: [Entry] = []
        entries.reserveCapacity(Int(count))
        var seen = Set<Int>()
        for i in 0..<Int(count) {
            let o = get(Self.headerBytes + i * 16, UInt64.self)
            guard o <= UInt64(Int.max), Int(o) % pageSize == 0 else { throw bad("entry \(i): offset \(o) is not page-aligned") }
            guard seen.insert(Int(o)).inserted else { throw bad("entry \(i): page at offset \(o) recorded twice") }
            entries.append(Entry(offset: Int(o), nanoseconds: get(Self.headerBytes + i * 16 + 8, UInt64.self)))
        }
        self.init(identity: Identity(size: Int(size), digest: digest), pageSize: pageSize, runs: Swift.max(1, runs), entries: entries)
    }

    /// Reads a working-set file.
    /// - Throws: ``UffdError`` `.source` when the file cannot be read, `.argument` when it is not a valid working set.
    public init(contentsOf path: String) throws(UffdError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "cannot open working set \(path)") }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "reading working set \(path)") }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
            guard out.count <= 1 << 34 else { throw UffdError(.argument, .fileTooLarge, detail: "\(path) is too large for a working set") }
        }
        try self.init(decoding: out, name: path)
    }

    /// Writes the file atomically (a temporary file renamed over `path`).
    /// - Throws: ``UffdError`` `.source` with the errno of open/write/rename.
    public func write(to path: String) throws(UffdError) {
        let tmp = path + ".tmp.\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "cannot create \(tmp)") }
        let data = encoded()
        var done = 0
        while done < data.count {
            let n = data.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                let e = errno
                close(fd)
                unlink(tmp)
                throw UffdError(.source, Errno(rawValue: e), detail: "writing \(tmp)")
            }
            done += n
        }
        close(fd)
        guard rename(tmp, path) == 0 else {
            let e = errno
            unlink(tmp)
            throw UffdError(.source, Errno(rawValue: e), detail: "renaming \(tmp) to \(path)")
        }
    }
}

let fnvOffset: UInt64 = 0xcbf2_9ce4_8422_2325

/// FNV-1a, 64-bit, continuing from `h`.
func fnv1a(_ bytes: UnsafeRawBufferPointer, _ h: UInt64) -> UInt64 {
    var h = h
    for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return h
}
