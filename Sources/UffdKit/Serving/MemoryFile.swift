import CUffd
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One region's bytes in a memory file, read with pread(2) into the reader's scratch memory.
/// Unlike ``FileSource``, a short read is an error: the regions were checked against the file
/// when the process was adopted, so a file that has shrunk since is a read error (the fault gets
/// the handler's fallback and is reported), never silently zeros.
public final class MemoryFileSource: PageSource, Sendable {
    /// The region's length.
    public let length: Int
    /// The memory file (not owned: the server keeps it open).
    public let fd: Int32
    /// Where the region starts in the file.
    public let fileOffset: Int

    /// `length` bytes of `fd` from `fileOffset`.
    public init(fd: Int32, fileOffset: Int, length: Int) {
        self.fd = fd
        self.fileOffset = fileOffset
        self.length = length
    }

    /// Reads `[offset, offset+count)` of the region into `scratch`.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "MemoryFileSource needs scratch memory") }
        var got = 0
        let want = Swift.max(0, Swift.min(count, length - offset))
        while got < want {
            let n = pread(fd, scratch + got, want - got, off_t(fileOffset + offset + got))
            if n > 0 { got += n; continue }
            if n < 0 && errno == EINTR { continue }
            let e: Errno = n == 0 ? .ioError : Errno(rawValue: errno)
            throw UffdError(.source, e, bytesDone: got,
                            detail: "memory file read at \(fileOffset + offset + got)" + (n == 0 ? " (file shorter than the regions)" : ""))
        }
        if got < count { memset(scratch + got, 0, count - got) }
        return UnsafeRawPointer(scratch)
    }
}

/// A read-only `MAP_SHARED` mapping of a memory file: its page-cache pages. The pages the page
/// cache holds at start-up (all of a file in tmpfs except its holes, a warm file on disk) are
/// mapped then, once per server, shared by every VM served from the file: mapping them on the
/// fault path made a COPY from a tmpfs file 1.3x the time of a COPY from mapped memory
/// (BENCHMARKS.md, issue 14); at start-up it costs ~0.25-0.35 µs per 4 KiB page. Pages not
/// resident stay lazy (the kernel faults them in during UFFDIO_COPY): nothing is read from disk
/// up front.
public final class MemoryFileMapping: Sendable {
    /// Where the file starts in this process.
    public let address: UInt
    /// The bytes mapped (the file's length when mapped).
    public let length: Int
    /// Bytes populated at start-up (the file's pages in the page cache then, with `populate`).
    public let populatedBytes: Int

    /// Maps `length` bytes of `fd` read-only; with `populate`, the pages of it the page cache
    /// holds are mapped now.
    public init(fd: Int32, length: Int, populate: Bool = true) throws(UffdError) {
        let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw UffdError(.map, Errno(rawValue: errno), detail: "memory file, \(length) bytes") }
        address = UInt(bitPattern: p)
        self.length = length
        populatedBytes = populate ? populateResident(address: p, length: length) : 0
    }

    deinit { munmap(UnsafeMutableRawPointer(bitPattern: address), length) }
}

/// One region of a mapped memory file: resolutions copy straight from the mapping (zero-copy
/// source). A page the file no longer has (truncated since) makes the UFFDIO_COPY fail with
/// EFAULT; the handler's fallback then applies and the failure is reported.
public struct MappedFileSource: PageSource {
    /// The region's first byte in the mapping.
    public let base: UInt
    /// The region's length.
    public let length: Int

    /// `length` bytes at `base` of a ``MemoryFileMapping``.
    public init(base: UInt, length: Int) {
        self.base = base
        self.length = length
    }

    /// A pointer into the mapping (no copy).
    @inline(__always)
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        guard offset >= 0, offset + count <= length else {
            throw UffdError(.source, .badAddress, detail: "read past the region at \(offset)+\(count)")
        }
        return UnsafeRawPointer(bitPattern: base + UInt(offset))!
    }
}

/// One region's window of a shared image source (a remote or packed snapshot from
/// ``PageSources/shared(_:options:)``): `length` bytes from `offset` of `image`. Zero chunks of
/// a packed image stay known as zeros (ZEROPAGE instead of a copy). Used on the synchronous path
/// when the region cannot take the deferred one (see ``DeferredImageWindow``).
public struct ImageWindow: ZeroAwarePageSource {
    /// The whole image (shared by every VM restored from it).
    public let image: any PageSource
    /// Where the region starts in the image.
    public let offset: Int
    /// The region's length.
    public let length: Int
    private let zeroAware: (any ZeroAwarePageSource)?

    /// `length` bytes of `image` from `offset`.
    public init(image: any PageSource, offset: Int, length: Int) {
        self.image = image
        self.offset = offset
        self.length = length
        zeroAware = image as? any ZeroAwarePageSource
    }

    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        try image.bytes(at: self.offset + offset, count: count, scratch: scratch)
    }

    public func isZero(at offset: Int, count: Int) -> Bool {
        zeroAware?.isZero(at: self.offset + offset, count: count) ?? false
    }
}

/// One region's window of a deferred image source (``ChunkedSource``): the reader requests the
/// region's chunk and goes on with other faults while it is fetched, so one slow fetch never
/// stalls another VM's or another chunk's faults. Needs the region to start on a chunk boundary
/// of the image (Firecracker's regions do: they start at 0 and at multiples of 2 MiB) and the
/// chunk to be a multiple of the region's page size; ``usable(image:offset:pageSize:)`` says so.
public struct DeferredImageWindow: DeferredSource {
    /// The whole image.
    public let image: any DeferredSource
    /// Where the region starts in the image (a multiple of the image's chunk size).
    public let offset: Int
    /// The region's length.
    public let length: Int
    public var chunkSize: Int { image.chunkSize }

    /// `length` bytes of `image` from `offset` (check ``usable(image:offset:pageSize:)`` first).
    public init(image: any DeferredSource, offset: Int, length: Int) {
        self.image = image
        self.offset = offset
        self.length = length
    }

    /// Whether a region at `offset` with pages of `pageSize` can be served deferred from `image`.
    public static func usable(image: any DeferredSource, offset: Int, pageSize: Int) -> Bool {
        let c = image.chunkSize
        return c > 0 && offset % c == 0 && c % pageSize == 0
    }

    public func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        image.fetch(offset: self.offset + offset, length: length, into: fetch)
    }
}
