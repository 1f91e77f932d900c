import CUffdNet
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A ``ChunkedSource`` is also a ``DeferredSource``: with ``DeferredCopyPolicy`` the reader
/// thread never waits for the network. A fault's chunk is requested through the cache
/// (`cunet_source_prefetch`: joined when already in flight, at once when cached or a zero
/// chunk); when it is there the chunk is UFFDIO_COPYed straight from the pinned cache slot
/// (no extra copy) on the fetcher thread, waking every thread faulting in it. A failed fetch
/// (after the retries) or a corrupt frame fails the request: the handler's fallback covers
/// the chunk and the reason reaches the owner.
extension ChunkedSource: DeferredSource {
    /// Starts bringing the chunk at `offset` in and finishes `fetch` when it is there.
    public func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        let chunk = offset / chunkSize
        guard offset % chunkSize == 0, length <= chunkSize else {
            fetch.fail(UffdError(.source, .invalidArgument, detail: "deferred fetch \(offset)+\(length) is not one chunk of \(chunkSize)"))
            return
        }
        if isZero(at: offset, count: length) {
            fetch.deliver(UnsafeRawBufferPointer(start: ChunkedSource.zeros(chunkSize), count: length))
            return
        }
        let request = Unmanaged.passRetained(PendingChunk(source: self, fetch: fetch, chunk: chunk)).toOpaque()
        let rc = cunet_source_prefetch(handle, UInt64(chunk), pendingChunkDone, request)
        if rc < 0 {
            Unmanaged<PendingChunk>.fromOpaque(request).release()
            fetch.fail(UffdError(.source, rc: rc, detail: "chunk \(chunk) of \(location): every cache slot is busy or loading"))
        }
    }

    /// A never-written, read-only run of zeros (reads map the zero page; nothing is allocated).
    static func zeros(_ count: Int) -> UnsafeRawPointer {
        let size = max(count, 64 << 20)
        if let z = zeroRun.load(), z.count >= count { return z.base }
        let m = mmap(nil, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let run = ZeroRun(base: UnsafeRawPointer(m), count: size)
        return zeroRun.publish(run).base
    }
}

/// A deferred chunk request on its way (one per chunk fetch, not per fault).
final class PendingChunk {
    let source: ChunkedSource
    let fetch: DeferredFetch
    let chunk: Int
    var attempts = 0
    init(source: ChunkedSource, fetch: DeferredFetch, chunk: Int) {
        self.source = source
        self.fetch = fetch
        self.chunk = chunk
    }
}

/// Completion of `cunet_source_prefetch` (on the fetcher thread, or at once when cached):
/// deliver from the pinned slot, or fail with the reason.
private let pendingChunkDone: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?) -> Void = { ctx, result, reason in
    let p = Unmanaged<PendingChunk>.fromOpaque(ctx!)
    let pending = p.takeUnretainedValue()
    let source = pending.source
    if result < 0 {
        p.release()
        pending.fetch.fail(UffdError(.source, Errno(rawValue: -result), detail: reason.map { String(cString: $0) } ?? ""))
        return
    }
    var bytes: UnsafeRawPointer?
    if cunet_source_acquire(source.handle, UInt64(pending.chunk), &bytes) == 0, let bytes {
        pending.fetch.deliver(UnsafeRawBufferPointer(start: bytes, count: pending.fetch.length))
        cunet_source_release(source.handle, UInt64(pending.chunk))
        p.release()
        return
    }
    // Evicted between its arrival and this call (a cache far smaller than the fetches in
    // flight): ask again, a bounded number of times.
    pending.attempts += 1
    if pending.attempts > 3 || cunet_source_prefetch(source.handle, UInt64(pending.chunk), pendingChunkDone, ctx) < 0 {
        p.release()
        pending.fetch.fail(UffdError(.source, .noBufferSpace,
                                     detail: "chunk \(pending.chunk) was evicted before it could be copied: raise the chunk cache"))
    }
}

/// The shared zero run (published once; a racing second mapping is kept, harmlessly).
final class ZeroRun: @unchecked Sendable {
    let base: UnsafeRawPointer
    let count: Int
    init(base: UnsafeRawPointer, count: Int) { self.base = base; self.count = count }
}

final class ZeroRunSlot: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var run: ZeroRun?
    init() { pthread_mutex_init(&lock, nil) }
    func load() -> ZeroRun? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return run }
    func publish(_ r: ZeroRun) -> ZeroRun {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        if let run, run.count >= r.count { return run }
        run = r
        return r
    }
}

let zeroRun = ZeroRunSlot()
