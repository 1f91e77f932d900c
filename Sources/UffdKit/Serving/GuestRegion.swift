import Foundation

/// One region of a process's memory handed to a server: what Firecracker calls a
/// `GuestRegionUffdMapping`. The hand-off body is a JSON array of these, exactly as Firecracker
/// sends it (v1.1 through v1.16):
/// `[{"base_host_virt_addr":140309461729280,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]`.
///
/// `page_size` is in bytes; `page_size_kib` is its deprecated duplicate which, despite its
/// name, also holds bytes (Firecracker v1.7–v1.11 send only it). Both are accepted; when both
/// are present they must agree.
public struct GuestRegion: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Where the region starts in the sender's address space.
    public var baseHostVirtAddr: UInt
    /// Its length in bytes.
    public var size: Int
    /// Where its contents start in the memory file.
    public var offset: Int
    /// Its page size in bytes (4096, or 2097152 for a hugetlbfs guest).
    public var pageSize: Int

    /// A region of `size` bytes at `baseHostVirtAddr`, served from `offset` of the memory file.
    public init(baseHostVirtAddr: UInt, size: Int, offset: Int, pageSize: Int) {
        self.baseHostVirtAddr = baseHostVirtAddr
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
    }

    enum CodingKeys: String, CodingKey {
        case baseHostVirtAddr = "base_host_virt_addr"
        case size, offset
        case pageSize = "page_size"
        case pageSizeKib = "page_size_kib"
    }

    /// Decodes Firecracker's field names; `page_size` or the legacy `page_size_kib` (bytes).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        baseHostVirtAddr = try c.decode(UInt.self, forKey: .baseHostVirtAddr)
        size = try c.decode(Int.self, forKey: .size)
        offset = try c.decode(Int.self, forKey: .offset)
        let bytes = try c.decodeIfPresent(Int.self, forKey: .pageSize)
        let legacy = try c.decodeIfPresent(Int.self, forKey: .pageSizeKib)
        switch (bytes, legacy) {
        case (let b?, let l?) where b != l:
            throw DecodingError.dataCorruptedError(forKey: .pageSizeKib, in: c,
                debugDescription: "page_size \(b) and page_size_kib \(l) disagree (both are bytes)")
        case (let b?, _): pageSize = b
        case (nil, let l?): pageSize = l
        case (nil, nil):
            throw DecodingError.keyNotFound(CodingKeys.pageSize, .init(codingPath: c.codingPath,
                debugDescription: "neither page_size nor page_size_kib"))
        }
    }

    /// Encodes as Firecracker does: both page-size fields, in bytes.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(baseHostVirtAddr, forKey: .baseHostVirtAddr)
        try c.encode(size, forKey: .size)
        try c.encode(offset, forKey: .offset)
        try c.encode(pageSize, forKey: .pageSize)
        try c.encode(pageSize, forKey: .pageSizeKib)
    }

    /// `0x7f..+128.0MiB@file+0 (4 KiB pages)`.
    public var description: String {
        "0x\(String(baseHostVirtAddr, radix: 16))+\(size)@file+\(offset) (page \(pageSize))"
    }

    /// The region's end address.
    public var end: UInt { baseHostVirtAddr &+ UInt(size) }

    /// The page sizes a guest may use: base pages and 2 MiB huge pages.
    public static let supportedPageSizes = [4096, 2 << 20]

    /// Decodes a hand-off body (a JSON array of regions).
    /// - Throws: ``HandoffError`` `.malformed` with one line naming what is wrong.
    public static func decode(_ body: [UInt8]) throws(HandoffError) -> [GuestRegion] {
        do {
            return try JSONDecoder().decode([GuestRegion].self, from: Data(body))
        } catch let e as DecodingError {
            throw HandoffError(.malformed, Self.explain(e))
        } catch {
            throw HandoffError(.malformed, "the body is not a JSON array of regions: \(error)")
        }
    }

    /// Encodes regions as a hand-off body.
    public static func encode(_ regions: [GuestRegion]) -> [UInt8] {
        // Encoding plain integers and strings cannot fail.
        Array((try? JSONEncoder().encode(regions)) ?? Data("[]".utf8))
    }

    private static func explain(_ e: DecodingError) -> String {
        func path(_ c: DecodingError.Context) -> String {
            c.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
        }
        switch e {
        case .dataCorrupted(let c) where c.codingPath.isEmpty:
            return "the body is not valid JSON (truncated or malformed)"
        case .dataCorrupted(let c): return "region\(path(c)): \(c.debugDescription)"
        case .keyNotFound(let k, let c): return "region\(path(c)) lacks \"\(k.stringValue)\""
        case .typeMismatch(_, let c) where c.codingPath.isEmpty:
            return "the body is not a JSON array of regions"
        case .typeMismatch(_, let c), .valueNotFound(_, let c):
            return "region\(path(c)) has the wrong type (want a non-negative integer)"
        @unknown default: return "the body is not a JSON array of regions"
        }
    }

    /// Checks regions against the memory file and each other: at least one; each of a
    /// supported page size, non-empty, its address, size and offset multiples of its page size,
    /// inside the file; no two overlapping in the address space.
    /// - Throws: ``HandoffError`` `.invalidRegions` naming the first problem.
    public static func validate(_ regions: [GuestRegion], memoryFileLength: Int) throws(HandoffError) {
        guard !regions.isEmpty else { throw HandoffError(.invalidRegions, "no regions in the hand-off") }
        for (i, r) in regions.enumerated() {
            guard supportedPageSizes.contains(r.pageSize) else {
                throw HandoffError(.invalidRegions, "region[\(i)] page_size \(r.pageSize) is not 4096 or 2097152")
            }
            guard r.size > 0 else { throw HandoffError(.invalidRegions, "region[\(i)] has size 0") }
            guard r.offset >= 0 else { throw HandoffError(.invalidRegions, "region[\(i)] has a negative offset") }
            let mask = r.pageSize - 1
            guard Int(r.baseHostVirtAddr & UInt(mask)) == 0, r.size & mask == 0, r.offset & mask == 0 else {
                throw HandoffError(.invalidRegions, "region[\(i)] \(r) is not aligned to its page size")
            }
            guard r.baseHostVirtAddr <= UInt.max - UInt(r.size) else {
                throw HandoffError(.invalidRegions, "region[\(i)] wraps around the address space")
            }
            let (fileEnd, o) = r.offset.addingReportingOverflow(r.size)
            guard !o, fileEnd <= memoryFileLength else {
                throw HandoffError(.invalidRegions,
                                   "region[\(i)] \(r) reaches past the memory file (\(memoryFileLength) bytes)")
            }
        }
        let sorted = regions.sorted { $0.baseHostVirtAddr < $1.baseHostVirtAddr }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.end > b.baseHostVirtAddr {
            throw HandoffError(.invalidRegions, "regions \(a) and \(b) overlap")
        }
    }
}

/// Why a hand-off was refused. ``description`` is one line for a log.
public struct HandoffError: Error, Sendable, CustomStringConvertible {
    /// The kind of problem.
    public enum Kind: String, Sendable {
        /// A socket call failed (`errno` says which).
        case socket
        /// The peer sent nothing within the timeout.
        case timeout
        /// The peer closed the connection before the message: the sender sent nothing (at the
        /// receiver), or the server refused the hand-off before reading it (at the sender:
        /// `sendmsg` met EPIPE or ECONNRESET).
        case closed
        /// The peer's uid is not allowed.
        case notAllowed
        /// No fd, or more than one.
        case fds
        /// The body is larger than the limit.
        case tooLarge
        /// The body is not the JSON expected.
        case malformed
        /// The regions are inconsistent or do not fit the memory file.
        case invalidRegions
        /// The fd is not a usable userfaultfd.
        case notUserfaultfd
    }

    /// The kind.
    public let kind: Kind
    /// What was wrong, in words.
    public let message: String

    /// An error of `kind`.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    /// `malformed: the body is not valid JSON ...`.
    public var description: String { "\(kind.rawValue): \(message)" }
}
