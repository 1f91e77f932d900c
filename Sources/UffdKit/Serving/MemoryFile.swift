import CUffd
import Synchronization
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
/// cache holds (all of a file in tmpfs except its holes, a warm file on disk) are mapped once
/// per server, shared by every VM served from the file: mapping them on the fault path made a
/// COPY from a tmpfs file 1.3x the time of a COPY from mapped memory (BENCHMARKS.md, issue 14);
/// it costs ~0.25-0.38 µs per 4 KiB page (~1.2-1.5 s for a 4 GiB tmpfs image). By default it
/// runs on a thread of its own (``Populate/background``), so a server (or a restarted worker
/// with VMs waiting) serves at once: a COPY from a page not populated yet is correct, only
/// slower. Pages not resident stay lazy (the kernel faults them in during UFFDIO_COPY): nothing
/// is read from disk up front.
///
/// Populating while the same mapping is the source of UFFDIO_COPYs is safe: both only read the
/// file's pages through this process's page tables. MADV_POPULATE_READ faults pages in as a read
/// access would (mmap_lock held for reading, each PTE set under its page-table lock, a page
/// already mapped left as it is); UFFDIO_COPY's copy_from_user of the source does the same for a
/// page not mapped yet; neither writes the file or changes the mapping. The mapping is unmapped
/// only after the populate thread has been joined (`deinit`).
public final class MemoryFileMapping: @unchecked Sendable {
    /// When the page-cache pages are mapped.
    public enum Populate: Sendable {
        /// Never: every page is mapped by the first COPY from it.
        case none
        /// In `init`, before it returns.
        case now
        /// On a dedicated thread started by `init` (the default): serving starts at once.
        case background
    }

    /// How a populate ended.
    public struct PopulateOutcome: Sendable, Equatable {
        /// The bytes mapped.
        public let bytes: Int
        /// Its duration.
        public let seconds: Double
        /// nil when every resident page was mapped; `.canceled` when the mapping was released
        /// first; otherwise why it stopped (`.badAddress`: the file shrank; `.invalidArgument`:
        /// no MADV_POPULATE_READ; or pthread_create's error). The rest is mapped by the copies.
        public let error: Errno?
    }

    /// Where the file starts in this process.
    public let address: UInt
    /// The bytes mapped (the file's length when mapped).
    public let length: Int
    /// When the pages are populated.
    public let populate: Populate
    private let state: PopulateState
    private let thread = Mutex<(thread: pthread_t, joined: Bool)?>(nil)

    /// Bytes populated so far (grows while a ``Populate/background`` populate runs).
    public var populatedBytes: Int { Int(cuffd_atomic_load_u64(state.progress)) }

    /// How the populate ended; nil while it runs (or with ``Populate/none``).
    public var populateOutcome: PopulateOutcome? { state.outcome.withLock { $0 } }

    /// Maps `length` bytes of `fd` read-only and maps the pages of it the page cache holds as
    /// `populate` says. `whenPopulated` is called once the populate ends (also when stopped by
    /// `deinit`, with `.canceled`): on the populate thread for ``Populate/background``, in
    /// `init` for ``Populate/now``, never for ``Populate/none``.
    public init(fd: Int32, length: Int, populate: Populate = .background,
                whenPopulated: (@Sendable (PopulateOutcome) -> Void)? = nil) throws(UffdError) {
        let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw UffdError(.map, Errno(rawValue: errno), detail: "memory file, \(length) bytes") }
        address = UInt(bitPattern: p)
        self.length = length
        self.populate = populate
        state = PopulateState(address: address, length: length, whenPopulated: whenPopulated)
        switch populate {
        case .none: break
        case .now: state.run()
        case .background:
            var t = pthread_t()
            let arg = Unmanaged.passRetained(state).toOpaque()
            let rc = pthread_create(&t, nil, populateMain, arg)
            if rc == 0 {
                thread.withLock { $0 = (t, false) }
            } else {
                // Best effort: without the thread the pages are mapped by the copies.
                Unmanaged<PopulateState>.fromOpaque(arg).release()
                state.finish(PopulateOutcome(bytes: 0, seconds: 0, error: Errno(rawValue: rc)))
            }
        }
    }

    /// Maps `length` bytes of `fd` read-only; with `populate`, the pages of it the page cache
    /// holds are mapped now (``Populate/now``), else none (``Populate/none``).
    public convenience init(fd: Int32, length: Int, populate: Bool) throws(UffdError) {
        try self.init(fd: fd, length: length, populate: populate ? .now : .none)
    }

    /// Waits up to `timeout` seconds for a background populate to end (at once otherwise);
    /// whether it has (then ``populateOutcome`` is set and `whenPopulated` has returned).
    @discardableResult
    public func waitForPopulate(timeout: Double) -> Bool {
        thread.withLock { t in
            guard let cur = t, !cur.joined else { return true }
            let ms = UInt32(Swift.min(Swift.max(0, timeout) * 1000, Double(UInt32.max)))
            guard cuffd_join_within(cur.thread, ms) == 0 else { return false }
            t = (cur.thread, true)
            return true
        }
    }

    deinit {
        // Stop a populate still running (it checks between runs of at most 64 MiB) and join it
        // before the munmap: it must never populate an address range reused meanwhile.
        cuffd_atomic_store_int(state.cancel, 1)
        if let t = thread.withLock({ $0 }), !t.joined { pthread_join(t.thread, nil) }
        munmap(UnsafeMutableRawPointer(bitPattern: address), length)
    }
}

/// What a populate and its owner share: the counter the C loop publishes, the cancel flag it
/// polls (C memory, read and written with __atomic builtins), the outcome. Kept alive by the
/// populate thread too, so it outlives whichever ends last.
private final class PopulateState: @unchecked Sendable {
    let address: UInt
    let length: Int
    let whenPopulated: (@Sendable (MemoryFileMapping.PopulateOutcome) -> Void)?
    let progress = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    let cancel = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
    let outcome = Mutex<MemoryFileMapping.PopulateOutcome?>(nil)

    init(address: UInt, length: Int, whenPopulated: (@Sendable (MemoryFileMapping.PopulateOutcome) -> Void)?) {
        self.address = address
        self.length = length
        self.whenPopulated = whenPopulated
        progress.initialize(to: 0)
        cancel.initialize(to: 0)
    }

    deinit {
        progress.deallocate()
        cancel.deallocate()
    }

    /// Populates the resident pages (cuffd_populate_resident), then reports the outcome.
    func run() {
        let t0 = monotonicNanoseconds()
        let rc = cuffd_populate_resident(UnsafeMutableRawPointer(bitPattern: address), UInt64(length), progress, cancel)
        let seconds = Double(monotonicNanoseconds() - t0) / 1e9
        finish(.init(bytes: Int(cuffd_atomic_load_u64(progress)), seconds: seconds, error: rc < 0 ? Errno(rawValue: -rc) : nil))
    }

    func finish(_ o: MemoryFileMapping.PopulateOutcome) {
        outcome.withLock { $0 = o }
        whenPopulated?(o)
    }
}

/// The populate thread's body (a dedicated pthread: never Swift's cooperative pool).
private func populateMain(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let state = Unmanaged<PopulateState>.fromOpaque(arg!).takeRetainedValue()
    _ = cuffd_set_thread_name("uffd-populate")
    state.run()
    return nil
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
