// The same resolutions as the C kernels, decided by a Swift FaultPolicy in a UffdKit
// FaultHandler: the memory, the faulting threads (cubench_touch), the placement and the check
// afterwards are those of cubench_uffd, so the ratio to the minimal C handler is the cost of
// the Swift layer per fault.
import CUffd
import CUffdBench
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// How a UffdKit case resolves faults.
public enum KitPolicyKind: Sendable {
    /// CopyPolicy over a MemorySource (4 KiB per fault).
    case copy
    /// ZeroFillPolicy, read faults.
    case zeropage
    /// ContinuePolicy over shmem whose page cache was filled through the alias view.
    case `continue`
    /// WriteTrackerPolicy (dirty bit + unprotect) over populated, write-protected memory.
    case wp
    /// MovePolicy from a populated MADV_DONTFORK donor, `granule` bytes per fault (THP donor
    /// and destination when the granule is 2 MiB).
    case move(granule: Int)
    /// ReadaheadPolicy(fixed window) over CopyPolicy over a MemorySource.
    case readahead(windowBytes: Int)

    var label: String {
        switch self {
        case .copy: "copy"
        case .zeropage: "zeropage"
        case .continue: "continue"
        case .wp: "wp"
        case .move(let g): g > 4096 ? "move-\(g >> 20)m" : "move"
        case .readahead(let w): "readahead-\(w >> 10)k"
        }
    }

    var window: Int {
        switch self {
        case .move(let g): g
        case .readahead(let w): w
        default: 4096
        }
    }
}

/// Handler tuning of a UffdKit case (the FaultHandler options that matter for speed).
public struct KitTuning: Sendable {
    /// Messages per read.
    public var batch: Int = 16
    /// Non-blocking reads before poll (FaultHandler.Options.spinPolls).
    public var spinPolls: UInt32 = 0

    /// The defaults of FaultHandler.Options.
    public init(batch: Int = 16, spinPolls: UInt32 = 0) {
        self.batch = batch
        self.spinPolls = spinPolls
    }
}

/// What the watchdog needs to unblock the faulting threads (kit.* and kit.file.* rows).
final class KitWatch: @unchecked Sendable {
    let handler: FaultHandler
    let uffd: Userfaultfd
    let start: UInt
    let length: Int
    init(handler: FaultHandler, uffd: Userfaultfd, start: UInt, length: Int) {
        self.handler = handler
        self.uffd = uffd
        self.start = start
        self.length = length
    }
}

let kitUnblock: cubench_unblock_fn = { ctx in
    let w = Unmanaged<KitWatch>.fromOpaque(ctx!).takeUnretainedValue()
    w.handler.stop()
    try? w.uffd.unregister(w.start, length: w.length)
}

private func kitFailure(_ e: UffdError, _ what: String) -> BenchFailure {
    BenchFailure(errno: e.errno.rawValue, operation: "\(what): \(e)")
}

/// The handler CPUs of a placement, as FaultHandler.Options.cpus wants them.
func handlerCPUs(_ pl: BenchPlacement) -> [Int]? {
    guard pl.handlerCPU >= 0 else { return nil }
    let n = Int(max(pl.handlerThreads, 1)), ncpu = Int(cubench_ncpus())
    return (0..<n).map { pl.spreadHandlers ? (Int(pl.handlerCPU) + $0) % ncpu : Int(pl.handlerCPU) % ncpu }
}

/// Runs one UffdKit case: maps and fills like cubench_uffd, serves the faults with a
/// FaultHandler (readers and CPUs from `placement`, fallback zero-fill so a failed resolution
/// shows up in the counters instead of killing the run), touches every page from the pinned
/// faulting threads, and checks one byte per page afterwards.
public func runKitCase(_ kind: KitPolicyKind, pages: Int, placement: BenchPlacement,
                       tuning: KitTuning = KitTuning(), prime: Bool = true) -> Result<BenchSample, BenchFailure> {
    let window = kind.window
    let big = window >= 2 << 20
    let len = (pages * 4096 + window - 1) / window * window
    var features: Features = []
    var modes: RegisterMode = .missing
    switch kind {
    case .continue: features = [.minorShmem]; modes = .minor
    case .wp: features = [.pagefaultFlagWP]; modes = .writeProtect
    case .move: features = [.move]
    default: break
    }
    do {
        let available = try Userfaultfd.probe()
        if !available.contains(features) {
            return .failure(BenchFailure(errno: EOPNOTSUPP, operation: "kit.\(kind.label): features \(features)"))
        }
        let region: MappedRegion
        if case .continue = kind {
            region = try MappedRegion(.shmem, length: len)
            memset(region.alias!, 0x5a, len)
        } else {
            // As cubench_uffd: 2 MiB-aligned for 2 MiB windows; THP-eligible only as the
            // destination of 2 MiB moves (its THP dst row), MADV_NOHUGEPAGE otherwise.
            var thpDest = false
            if case .move = kind, big { thpDest = true }
            region = try MappedRegion(.anonymous(thpAligned: big), length: len)
            try region.advise(thpDest ? MADV_HUGEPAGE : MADV_NOHUGEPAGE)
        }
        var keep: [AnyObject] = []
        let policy: any FaultPolicy
        let uffd = try Userfaultfd(features: features)
        switch kind {
        case .copy, .readahead:
            let source = MemorySource(length: len) { memset($0.baseAddress!, 0x5a, $0.count) }
            let copy = CopyPolicy(region: region, source: source)
            if case .readahead(let w) = kind {
                policy = ReadaheadPolicy(copy, window: .fixed(pages: w / 4096))
            } else {
                policy = copy
            }
            _ = try uffd.register(region, modes: modes)
        case .zeropage:
            policy = ZeroFillPolicy(region: region)
            _ = try uffd.register(region, modes: modes)
        case .continue:
            policy = try ContinuePolicy(region: region)
            _ = try uffd.register(region, modes: modes)
        case .wp:
            if madvise(region.pointer, len, 23 /* MADV_POPULATE_WRITE */) != 0 {
                return .failure(BenchFailure(errno: errno, operation: "kit.wp: MADV_POPULATE_WRITE"))
            }
            memset(region.pointer, 0x5a, len)
            let tracker = WriteTrackerPolicy(region: region)
            _ = try uffd.register(region, modes: modes)
            try tracker.arm(uffd)
            policy = tracker
        case .move(let granule):
            let donor = try MappedRegion.donor(length: len, alignment: big ? 2 << 20 : 0, hugePages: big)
            if !big { try donor.advise(MADV_NOHUGEPAGE) }
            if madvise(donor.pointer, len, 23 /* MADV_POPULATE_WRITE */) != 0 {
                return .failure(BenchFailure(errno: errno, operation: "kit.\(kind.label): populating the donor"))
            }
            memset(donor.pointer, 0x5a, len)
            keep.append(donor)
            policy = try MovePolicy(region: region, donor: donor, granule: granule)
            _ = try uffd.register(region, modes: modes)
        }
        var opts = FaultHandler.Options()
        opts.readers = Int(max(placement.handlerThreads, 1))
        opts.cpus = handlerCPUs(placement)
        opts.fallback = .zeroFill
        opts.batch = tuning.batch
        opts.spinPolls = tuning.spinPolls
        opts.failureLogCapacity = 4
        let handler = FaultHandler(uffd: uffd, policy: policy, options: opts)
        try handler.start()
        // The 2 MiB rows' C baselines prime the memory (CUBENCH_PRIME): so do they.
        if big && prime {
            let rc = cubench_prime_memory(UInt64(len))
            if rc < 0 {
                handler.stop()
                return .failure(BenchFailure(errno: -rc, operation: "kit.\(kind.label): priming memory"))
            }
        }
        let watch = KitWatch(handler: handler, uffd: uffd, start: region.address, length: len)
        var pl = placement.c
        var r = cubench_result()
        let write: UInt32 = if case .zeropage = kind { 0 } else { 1 }
        let rc = withExtendedLifetime(watch) {
            cubench_touch(region.pointer, UInt64(len), UInt64(window), &pl, write, 30000, kitUnblock,
                          Unmanaged.passUnretained(watch).toOpaque(), &r)
        }
        handler.stop()
        let stats = handler.stats()
        withExtendedLifetime(keep) {}
        guard rc == 0 else { return .failure(BenchFailure(errno: -rc, operation: "kit.\(kind.label): touching")) }
        if stats.fallbacks + stats.failures > 0 {
            let first = handler.failures().first.map { "\($0)" } ?? "no detail"
            return .failure(BenchFailure(errno: EIO, operation: "kit.\(kind.label): \(stats.fallbacks + stats.failures) failed resolutions (\(first))"))
        }
        let expected: UInt64 = if case .zeropage = kind { 0 } else { 0x5a * UInt64(len / 4096) }
        if cubench_page_sum(region.pointer, UInt64(len), 8) != expected {
            return .failure(BenchFailure(errno: EILSEQ, operation: "kit.\(kind.label): data check"))
        }
        let ioctls = stats.resolutions.values.reduce(0, +)
        return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes,
                                    counters: ["faults": Double(stats.faults), "ioctls": Double(ioctls),
                                               "reads": Double(stats.reads)]))
    } catch {
        return .failure(kitFailure(error, "kit.\(kind.label)"))
    }
}
