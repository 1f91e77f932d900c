import CUffd
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a copy policy gets page contents: bytes `[offset, offset+count)` of a logical image.
/// Reads past ``length`` are zeros (so a file of any size works, its tail page zero-filled).
///
/// Called on the fault path, on several reader threads at once: implementations must be
/// thread-safe and should not allocate.
public protocol PageSource: Sendable {
    /// The image size in bytes; bytes past it read as zeros.
    var length: Int { get }

    /// Returns a pointer to the `count` bytes at `offset`: the source's own memory when it has
    /// them contiguous, or `scratch` (at least `count` bytes, private to this call) after
    /// filling it. The bytes must stay valid until the resolution was performed.
    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer
}

extension PageSource {
    /// Fills `scratch` with the part of `[offset, offset+count)` that `fill` provides for
    /// `[offset, min(offset+count, length))`, and zeros after it.
    @inline(__always)
    func zeroTail(_ scratch: UnsafeMutableRawPointer, offset: Int, count: Int, filled: Int) {
        if filled < count { memset(scratch + filled, 0, count - filled) }
    }
}

/// An in-memory image (a page-aligned private copy of the bytes given).
public final class MemorySource: PageSource, @unchecked Sendable {
    /// The image size.
    public let length: Int
    private let base: UnsafeMutableRawPointer
    private let capacity: Int

    /// Copies `bytes` into a page-aligned buffer.
    public init(copying bytes: UnsafeRawBufferPointer) {
        let page = basePageSize
        length = bytes.count
        capacity = Swift.max(page, (bytes.count + page - 1) / page * page)
        base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: page)
        if let src = bytes.baseAddress, bytes.count > 0 { base.copyMemory(from: src, byteCount: bytes.count) }
        if capacity > length { memset(base + length, 0, capacity - length) }
    }

    /// Copies an array of bytes.
    public convenience init(_ bytes: [UInt8]) {
        self.init(copying: bytes.withUnsafeBytes { $0 })
    }

    /// A zero-filled image of `length` bytes that `initialize` may write.
    public init(length: Int, initialize: (UnsafeMutableRawBufferPointer) -> Void) {
        let page = basePageSize
        self.length = length
        capacity = Swift.max(page, (length + page - 1) / page * page)
        base = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: page)
        memset(base, 0, capacity)
        initialize(UnsafeMutableRawBufferPointer(start: base, count: length))
    }

    deinit { base.deallocate() }

    /// The image bytes (read-only use while a handler runs).
    public var buffer: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: length) }

    /// Direct pointers inside the image (zero-copy); scratch only for the part past the end.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        if offset >= 0 && offset + count <= capacity { return UnsafeRawPointer(base + offset) }
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "no scratch for a read past the image") }
        let avail = Swift.max(0, Swift.min(count, capacity - offset))
        if avail > 0 { scratch.copyMemory(from: base + offset, byteCount: avail) }
        zeroTail(scratch, offset: offset, count: count, filled: avail)
        return UnsafeRawPointer(scratch)
    }
}

/// A file read lazily (VM snapshot restore, post-copy): each fault reads only the pages it
/// resolves. The tail past the file's end (a size that is not a page multiple) reads as zeros.
///
/// Two ways to read (``Access``): `.pread` reads into the reader's scratch memory, then the
/// resolution copies scratch into the page (two copies of every byte); `.mapped` maps the file
/// read-only once and hands the kernel a pointer into that mapping, so UFFDIO_COPY copies
/// straight from the page cache into the new page (one copy). The library itself never reads
/// the mapping (only the kernel does, inside the ioctl), so a file truncated under a mapped
/// source cannot crash the process: the COPY of a page past the new end fails with EFAULT and
/// the handler's fallback resolves the fault (with `.pread` such pages read as zeros).
///
/// A `.mapped` file has the pages the page cache holds mapped at open (mincore, then
/// MADV_POPULATE_READ of the resident runs: all of a file in tmpfs or shmem except its holes,
/// all of a warm file on disk, nothing of a cold one): the COPY then reads mapped memory instead
/// of mapping the source's pages on the fault path, which made a COPY from a fresh mapping of a
/// tmpfs file 1.3x the time of a COPY from memory, and 1.0-1.25x on ext4 depending on its page
/// cache's folio sizes (BENCHMARKS.md, issue 14). Mapping costs page tables only (~0.25-0.35 µs
/// per 4 KiB page here, once, at open; 2 MiB of page tables per GiB), never a read from disk
/// (a page not resident stays lazy; a hole is never allocated). Pass `populate: false` for a
/// one-shot load of a small part of a large file.
public final class FileSource: PageSource, Sendable {
    /// How the bytes are read.
    public enum Access: Sendable, Hashable {
        /// pread(2) into scratch memory (two copies: file → scratch → page).
        case pread
        /// A read-only mmap(2) of the file, UFFDIO_COPY reads from it (one copy).
        case mapped
    }

    /// The file size.
    public let length: Int
    /// The open file (closed on deinit).
    public let fd: Int32
    /// Byte offset in the file where the image starts.
    public let fileOffset: Int
    /// How the bytes are read.
    public let access: Access
    /// `.mapped`: bytes of the mapping populated at open (the file's pages in the page cache).
    public let populatedBytes: Int
    /// `.mapped`: address of image byte 0 inside the mapping (0 when not mapped).
    private let image: UInt
    private let mapBase: UInt
    private let mapLength: Int

    /// Opens `path` read-only; `.mapped` also maps it (falls back to `.pread` for an empty image)
    /// and, with `populate`, maps now the pages of it the page cache holds.
    /// - Throws: ``UffdError`` `.source` with the errno of open/fstat/mmap.
    public init(path: String, offset: Int = 0, access: Access = .pread, populate: Bool = true) throws(UffdError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "open \(path)") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw UffdError(.source, Errno(rawValue: e), detail: "fstat \(path)")
        }
        self.fd = fd
        self.fileOffset = offset
        let length = Swift.max(0, Int(st.st_size) - offset)
        self.length = length
        if access == .mapped && length > 0 {
            // mmap needs a page-aligned file offset: map from the page holding `offset`.
            let aligned = offset / basePageSize * basePageSize
            let mlen = length + (offset - aligned)
            guard let m = mmap(nil, mlen, PROT_READ, MAP_PRIVATE, fd, off_t(aligned)), m != MAP_FAILED else {
                let e = errno
                close(fd)
                throw UffdError(.source, Errno(rawValue: e), detail: "mmap \(path) (\(mlen) bytes)")
            }
            mapBase = UInt(bitPattern: m)
            mapLength = mlen
            image = mapBase + UInt(offset - aligned)
            self.access = .mapped
            populatedBytes = populate ? populateResident(address: m, length: mlen) : 0
        } else {
            populatedBytes = 0
            mapBase = 0
            mapLength = 0
            image = 0
            self.access = .pread
        }
    }

    deinit {
        if mapBase != 0 { munmap(UnsafeMutableRawPointer(bitPattern: mapBase), mapLength) }
        close(fd)
    }

    /// `.mapped`: a pointer into the mapping when the range lies inside the file; otherwise (and
    /// with `.pread`) reads into `scratch`, zero-filled past the end of the file.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        if image != 0 && offset >= 0 && offset + count <= length {
            return UnsafeRawPointer(bitPattern: image + UInt(offset))!
        }
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "FileSource needs scratch memory") }
        try read(into: scratch, at: offset, count: count)
        return UnsafeRawPointer(scratch)
    }

    /// Reads `[offset, offset+count)` of the image into `dst` with pread(2), zeros past the end
    /// of the file (also when it shrank meanwhile). The one copy of a window installer's fill.
    public func read(into dst: UnsafeMutableRawPointer, at offset: Int, count: Int) throws(UffdError) {
        var got = 0
        let want = Swift.max(0, Swift.min(count, length - offset))
        while got < want {
            let n = pread(fd, dst + got, want - got, off_t(fileOffset + offset + got))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n == 0 { break } // the file shrank: the rest reads as zeros
            throw UffdError(.source, Errno(rawValue: errno), bytesDone: got, detail: "pread at \(offset + got)")
        }
        zeroTail(dst, offset: offset, count: count, filled: got)
    }
}

/// Maps now the pages of a file mapping (`length` bytes at `address`) that the page cache
/// holds; the bytes mapped. Best effort: a failure (the file shrank meanwhile, a kernel without
/// MADV_POPULATE_READ) leaves the rest to be faulted in by the copies, as without it.
func populateResident(address: UnsafeMutableRawPointer, length: Int) -> Int {
    var done: UInt64 = 0
    _ = cuffd_populate_resident(address, UInt64(length), &done, nil)
    return Int(done)
}

/// A generated image: every 8-byte word is a function of its offset and a seed (tests,
/// benchmarks, synthetic workloads). ``word(at:seed:)`` gives the expected value.
public struct PatternSource: PageSource {
    /// The image size.
    public let length: Int
    /// The seed mixed into every word.
    public let seed: UInt64

    /// An image of `length` bytes.
    public init(length: Int, seed: UInt64 = 0x5EED) {
        self.length = length
        self.seed = seed
    }

    /// The word at byte `offset` (a multiple of 8) of an image with `seed`.
    @inlinable
    public static func word(at offset: Int, seed: UInt64) -> UInt64 {
        var x = UInt64(truncatingIfNeeded: offset) &+ seed &* 0x9E37_79B9_7F4A_7C15
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        return x ^ (x >> 31)
    }

    /// Generates the words into `scratch`; zeros past the end.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "PatternSource needs scratch memory") }
        let words = scratch.assumingMemoryBound(to: UInt64.self)
        let valid = Swift.max(0, Swift.min(count, length - offset))
        var i = 0
        while i * 8 + 8 <= valid {
            words[i] = PatternSource.word(at: offset + i * 8, seed: seed)
            i += 1
        }
        zeroTail(scratch, offset: offset, count: count, filled: i * 8)
        return UnsafeRawPointer(scratch)
    }
}

/// An image of zeros: what a page reads before anything is written to it. The bytes come from
/// one process-wide, read-only mapping of zeros as large as a huge page (shared by every
/// ZeroSource, mapped once, populated with the kernel's zero page so it costs no memory), so
/// a COPY of zeros reads no scratch: the way to zero-fill hugetlb memory, which has no
/// UFFDIO_ZEROPAGE. Larger reads are zeroed in scratch.
public struct ZeroSource: PageSource, @unchecked Sendable {
    /// The image size.
    public let length: Int
    /// The shared zeros (nil when they could not be mapped: scratch is then zeroed).
    public let zeros: UnsafeRawPointer?
    /// Bytes at ``zeros``.
    public let zerosLength: Int

    /// Bytes of the shared zero mapping (the largest `count` served without scratch).
    public static var sharedLength: Int { ZeroSource.shared.length }

    /// An image of `length` zero bytes.
    public init(length: Int) {
        self.length = length
        let shared = ZeroSource.shared
        self.zeros = shared.pointer
        self.zerosLength = shared.length
    }

    /// The shared zeros when `count` fits, else `scratch` zero-filled.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        if let zeros, count <= zerosLength { return zeros }
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "ZeroSource needs scratch memory for \(count) bytes") }
        memset(scratch, 0, count)
        return UnsafeRawPointer(scratch)
    }

    private struct Shared: @unchecked Sendable {
        let pointer: UnsafeRawPointer?
        let length: Int
    }

    /// Read-only private anonymous memory never written reads as zeros; MAP_POPULATE maps the
    /// zero page up front so a COPY from it takes no read faults. Kept for the process's life.
    private static let shared: Shared = {
        let len = Swift.max(hugePageSize ?? 0, 2 << 20)
        let m = mmap(nil, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE, -1, 0)
        guard let m, m != MAP_FAILED else { return Shared(pointer: nil, length: 0) }
        return Shared(pointer: UnsafeRawPointer(m), length: len)
    }()
}
