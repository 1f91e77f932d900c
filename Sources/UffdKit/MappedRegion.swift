import CUffd
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Memory to register: anonymous, memfd shmem (with an alias view), shmem mapped private,
/// hugetlb, or hugetlb mapped private. Unmapped (and the memfd closed) on deinit.
///
/// Marked `@unchecked Sendable`: it only holds addresses; what the memory holds is the
/// caller's business, as with any raw buffer.
public final class MappedRegion: @unchecked Sendable {
    /// The kind of memory.
    public enum Kind: Sendable, Hashable {
        /// Private anonymous memory; `thpAligned` aligns it to 2 MiB so THP can back it.
        case anonymous(thpAligned: Bool = false)
        /// A memfd mapped shared, plus a second shared view (``alias``) of the same pages.
        case shmem
        /// A memfd mapped private (copy-on-write over the file); ``alias`` is shared.
        case shmemPrivate
        /// A hugetlb memfd mapped shared, plus an alias; the length must be a multiple of
        /// the huge page size and huge pages must be reserved (`vm.nr_hugepages`).
        case hugetlb
        /// A hugetlb memfd mapped private (copy-on-write over the file); ``alias`` is shared.
        /// Huge pages as for ``hugetlb``; the private view reserves its own at map time.
        case hugetlbPrivate

        /// Whether the memory is backed by huge pages (``hugetlb``, ``hugetlbPrivate``).
        public var isHugetlb: Bool { self == .hugetlb || self == .hugetlbPrivate }
        /// Whether it is a file mapped private (``shmemPrivate``, ``hugetlbPrivate``): writes
        /// through the view never reach the file.
        public var isPrivateFile: Bool { self == .shmemPrivate || self == .hugetlbPrivate }
    }

    /// The kind of memory.
    public let kind: Kind
    /// The start address of the (registrable) view.
    public let address: UInt
    /// The length in bytes.
    public let length: Int
    /// The page size of the memory (the huge page size for hugetlb).
    public let pageSize: Int
    /// The second shared view of a memfd (nil for anonymous memory): writing there fills the
    /// page cache without faulting on the registered view (what CONTINUE maps).
    public let alias: UnsafeMutableRawPointer?
    /// The memfd (-1 for anonymous memory).
    public let memfd: Int32
    private let ownsMapping: Bool
    private var region: cuffd_region

    /// Maps `length` bytes of `kind`.
    /// - Throws: ``UffdError`` `.map` (ENOMEM for hugetlb usually means no huge pages are
    ///   reserved; EINVAL a length that is not a multiple of the page size).
    public init(_ kind: Kind, length: Int) throws(UffdError) {
        var r = cuffd_region()
        let ckind: Int32
        var thp = false
        switch kind {
        case .anonymous(let aligned): ckind = Int32(CUFFD_MEM_ANON.rawValue); thp = aligned
        case .shmem: ckind = Int32(CUFFD_MEM_SHMEM.rawValue)
        case .shmemPrivate: ckind = Int32(CUFFD_MEM_SHMEM_PRIVATE.rawValue)
        case .hugetlb: ckind = Int32(CUFFD_MEM_HUGETLB.rawValue)
        case .hugetlbPrivate: ckind = Int32(CUFFD_MEM_HUGETLB_PRIVATE.rawValue)
        }
        guard length > 0 else { throw UffdError(.argument, .invalidArgument, detail: "length 0") }
        let rc = cuffd_region_map(ckind, UInt64(length), thp, &r)
        guard rc == 0 else { throw UffdError(.map, rc: rc, detail: "\(kind) \(length) bytes") }
        self.kind = kind
        self.region = r
        self.address = UInt(bitPattern: r.addr)
        self.length = length
        self.pageSize = Int(r.page_size)
        self.alias = r.alias
        self.memfd = r.memfd
        self.ownsMapping = true
    }

    /// A donor region for UFFDIO_MOVE: anonymous, aligned to `alignment` (2 MiB lets THP
    /// back it; `hugePages` adds MADV_HUGEPAGE), MADV_DONTFORK so a fork never shares its pages
    /// (MOVE would say EBUSY). Populate it by writing the contents before the moves.
    public static func donor(length: Int, alignment: Int = 0, hugePages: Bool = false) throws(UffdError) -> MappedRegion {
        let m = try MappedRegion(.anonymous(thpAligned: alignment >= 2 << 20 || hugePages), length: length)
        try m.advise(MADV_DONTFORK)
        if hugePages { try m.advise(MADV_HUGEPAGE) }
        return m
    }

    /// madvise(2) on the whole region.
    public func advise(_ advice: Int32) throws(UffdError) {
        if madvise(pointer, length, advice) != 0 {
            throw UffdError(.map, Errno(rawValue: errno), detail: "madvise(\(advice))")
        }
    }

    /// madvise(2) on part of the region.
    public func advise(_ advice: Int32, offset: Int, length: Int) throws(UffdError) {
        if madvise(pointer + offset, length, advice) != 0 {
            throw UffdError(.map, Errno(rawValue: errno), detail: "madvise(\(advice)) at +\(offset)")
        }
    }

    /// The start as a pointer.
    public var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }

    /// The bytes as a buffer.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: length) }

    /// The end address (exclusive).
    public var end: UInt { address + UInt(length) }

    /// Whether `address` lies inside the region.
    public func contains(_ address: UInt) -> Bool { address >= self.address && address < end }

    deinit {
        if ownsMapping { cuffd_region_unmap(&region) }
    }
}
