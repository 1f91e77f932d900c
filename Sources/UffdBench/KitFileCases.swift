// Lazy file load through UffdKit (issue 14): InstallPolicy (window installer: pread into a THP
// donor + UFFDIO_MOVE, a prefetch thread) and the one-copy COPY path (ReadaheadPolicy over a
// CopyPolicy of a mapped FileSource) in a FaultHandler, the faulting thread cubench_touch's.

import CUffd
import CUffdBench
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// Which UffdKit load path a `kit.file.*` row measures.
enum KitFilePath: Sendable {
    /// InstallPolicy with `prefetch` threads (on the CPU after the handler's).
    case install(prefetch: Int)
    /// ReadaheadPolicy(.fixed 2 MiB) over CopyPolicy(FileSource(.mapped)): one copy, COPY only.
    case copyMapped
}

/// One run: `bytes` of the file at `path` loaded lazily through `path`, every page's tag checked.
func runKitFileLoad(_ kind: KitFilePath, path: String, bytes: UInt64, cold: Bool, hc: Int32, fc: Int32, prime: Bool = true)
    -> Result<BenchSample, BenchFailure> {
    let len = Int(bytes) & ~4095
    let ncpu = Int32(cubench_ncpus())
    do {
        if cold {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            if fd >= 0 {
                fdatasync(fd)
                posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
                close(fd)
            }
        }
        let region: MappedRegion
        let policy: any FaultPolicy
        let uffd = try Userfaultfd()
        var install: InstallPolicy?
        var openNs: UInt64 = 0, populated = 0
        switch kind {
        case .install(let prefetch):
            region = try MappedRegion(.anonymous(thpAligned: true), length: len)
            try region.advise(MADV_HUGEPAGE)
            _ = try uffd.register(region, modes: .missing)
            let p = InstallPolicy(region: region, uffd: uffd, source: try FileSource(path: path),
                                  prefetchThreads: prefetch, prefetchCPUs: [(hc + 1) % ncpu])
            install = p
            policy = p
        case .copyMapped:
            region = try MappedRegion(.anonymous(thpAligned: true), length: len)
            try region.advise(MADV_NOHUGEPAGE)
            _ = try uffd.register(region, modes: .missing)
            let t0 = cuffd_now_ns()
            let src = try FileSource(path: path, access: .mapped)
            openNs = cuffd_now_ns() - t0
            populated = src.populatedBytes
            policy = ReadaheadPolicy(CopyPolicy(region: region, source: src), window: .fixed(pages: 512))
        }
        var opts = FaultHandler.Options()
        opts.readers = 1
        opts.cpus = [Int(hc)]
        opts.fallback = .zeroFill
        opts.failureLogCapacity = 4
        let handler = FaultHandler(uffd: uffd, policy: policy, options: opts)
        try handler.start()
        // As cubench_file_load: primed right before the timed section (free page reporting).
        let primed = prime ? cubench_prime_memory(UInt64(len)) : 0
        if primed < 0 {
            handler.stop()
            install?.stopPrefetching()
            return .failure(BenchFailure(errno: -primed, operation: "kit.file: priming memory"))
        }
        let watch = KitWatch(handler: handler, uffd: uffd, start: region.address, length: len)
        var pl = cubench_placement(handler_cpu: hc, fault_cpu: fc, fault_threads: 1, handler_threads: 1,
                                   spread_handlers: 0, spread_faults: 0)
        var r = cubench_result()
        let rc = withExtendedLifetime(watch) {
            cubench_touch(region.pointer, UInt64(len), 2 << 20, &pl, 0, 120000, kitUnblock,
                          Unmanaged.passUnretained(watch).toOpaque(), &r)
        }
        handler.stop()
        install?.stopPrefetching()
        let stats = handler.stats()
        guard rc == 0 else { return .failure(BenchFailure(errno: -rc, operation: "kit.file: touching")) }
        let ist = install?.stats
        if stats.fallbacks + stats.failures > 0 || (ist?.failed ?? 0) > 0 {
            let first = handler.failures().first.map { "\($0)" } ?? "no detail"
            return .failure(BenchFailure(errno: EIO, operation: "kit.file: failed resolutions (\(first))"))
        }
        // Every page's tag, as cubench_file_create wrote it: page i starts with i * K + 1.
        let words = region.pointer.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(len / 4096) where words[i * 512] != UInt64(i) &* 0x9e37_79b9_7f4a_7c15 &+ 1 {
            return .failure(BenchFailure(errno: EILSEQ, operation: "kit.file: page \(i) differs from the file"))
        }
        var counters = ["faults": Double(stats.faults)]
        if let p = install, let ist {
            counters["windows"] = Double(ist.moved + ist.copied)
            counters["prefetched"] = Double(ist.prefetched)
            counters["hugeMiB"] = Double(((try? p.hugePageBytes()) ?? 0) >> 20)
        }
        if case .copyMapped = kind {
            // Opening the source (mapping it; on tmpfs also populating it), outside the timing.
            counters["openNsPerPage"] = Double(openNs) / Double(r.pages)
            counters["populatedMiB"] = Double(populated >> 20)
        }
        return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes, counters: counters))
    } catch {
        return .failure(BenchFailure(errno: error.errno.rawValue, operation: "kit.file: \(error)"))
    }
}
