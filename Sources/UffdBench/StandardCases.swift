// The standard cases: baselines, minimal C handlers, the C fault loop, bulk windows,
// placement, heap compaction and lazy file load.
import CUffd
import CUffdBench

#if canImport(Glibc)
import Glibc
#endif

/// Thread placement of a case, as the C kernels take it.
public struct BenchPlacement: Sendable {
    /// CPU of handler thread 0 (-1: unpinned).
    public var handlerCPU: Int32
    /// CPU of faulting thread 0 (-1: unpinned).
    public var faultCPU: Int32
    /// Faulting threads (1...8).
    public var faultThreads: UInt32
    /// Handler threads on the same uffd (1...8).
    public var handlerThreads: UInt32
    /// Handler i runs on (handlerCPU + i) % ncpus.
    public var spreadHandlers: Bool
    /// Faulting thread i runs on (faultCPU + i) % ncpus.
    public var spreadFaults: Bool

    /// `handlerThreads` handlers from `handlerCPU` and `faultThreads` faulting threads from
    /// `faultCPU`; spread threads go to consecutive CPUs.
    public init(handlerCPU: Int32, faultCPU: Int32, faultThreads: UInt32 = 1, handlerThreads: UInt32 = 1,
                spreadHandlers: Bool = false, spreadFaults: Bool = false) {
        self.handlerCPU = handlerCPU
        self.faultCPU = faultCPU
        self.faultThreads = faultThreads
        self.handlerThreads = handlerThreads
        self.spreadHandlers = spreadHandlers
        self.spreadFaults = spreadFaults
    }

    var c: cubench_placement {
        cubench_placement(handler_cpu: handlerCPU, fault_cpu: faultCPU, fault_threads: faultThreads,
                          handler_threads: handlerThreads, spread_handlers: spreadHandlers ? 1 : 0,
                          spread_faults: spreadFaults ? 1 : 0)
    }

    /// "H0 F0", "H0,1 F0,1x4": handler CPUs, faulting CPUs, thread counts.
    public var label: String {
        func cpus(_ base: Int32, _ n: UInt32, _ spread: Bool) -> String {
            guard base >= 0 else { return "*" }
            let ncpu = Int32(cubench_ncpus())
            if !spread || n == 1 { return String(base) }
            return (0..<min(Int32(n), ncpu)).map { String((base + $0) % ncpu) }.joined(separator: ",")
        }
        var s = "H" + cpus(handlerCPU, handlerThreads, spreadHandlers)
        if handlerThreads > 1 { s += "x\(handlerThreads)" }
        s += " F" + cpus(faultCPU, faultThreads, spreadFaults)
        if faultThreads > 1 { s += "x\(faultThreads)" }
        return s
    }
}

/// The resolving operation of a uffd case.
public enum BenchOp: UInt32, Sendable, CaseIterable {
    /// UFFDIO_COPY into MISSING anon.
    case copy = 0
    /// UFFDIO_ZEROPAGE (read faults).
    case zeropage
    /// UFFDIO_CONTINUE on MINOR shmem.
    case `continue`
    /// UFFDIO_WRITEPROTECT clear on write-protected anon.
    case wp
    /// UFFDIO_MOVE from a DONTFORK donor.
    case move

    /// Lower-case name used in case names.
    public var name: String {
        switch self {
        case .copy: "copy"
        case .zeropage: "zeropage"
        case .continue: "continue"
        case .wp: "wp"
        case .move: "move"
        }
    }
}

/// Runs one C uffd kernel; the sample counts faults and ioctls.
public func runUffdKernel(op: BenchOp, loop: Bool, pages: Int, window: UInt64 = 4096, flags: UInt32 = 0,
                          placement: BenchPlacement) -> Result<BenchSample, BenchFailure> {
    var p = cubench_uffd_params()
    p.pages = UInt64(pages)
    p.op = op.rawValue
    p.handler = loop ? UInt32(CUBENCH_HANDLER_LOOP.rawValue) : UInt32(CUBENCH_HANDLER_MINIMAL.rawValue)
    p.window = window
    p.flags = flags
    p.timeout_ms = 30000
    p.placement = placement.c
    var r = cubench_result()
    let rc = cubench_uffd(&p, &r)
    guard rc == 0 else {
        return .failure(BenchFailure(errno: -rc, operation: "cubench_uffd(\(op.name), window \(window))"))
    }
    return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes,
                                counters: ["faults": Double(r.faults), "ioctls": Double(r.ioctls)]))
}

private func baseline(_ name: String, _ f: (UInt64, UnsafePointer<cubench_placement>, UnsafeMutablePointer<cubench_result>) -> Int32,
                      pages: Int, placement: BenchPlacement) -> Result<BenchSample, BenchFailure> {
    var pl = placement.c
    var r = cubench_result()
    let rc = f(UInt64(pages), &pl, &r)
    guard rc == 0 else { return .failure(BenchFailure(errno: -rc, operation: name)) }
    return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes))
}

extension BenchmarkSuite {
    /// Every standard case for `options`.
    public static func standardCases(_ o: BenchmarkOptions) -> [BenchCase] {
        let n = o.effectivePages, bulk = o.effectiveBulkPages
        let ncpu = Int32(cubench_ncpus())
        let fc = o.faultCPU % ncpu, hc = o.handlerCPU % ncpu
        let other = (fc + 1) % ncpu
        let same = BenchPlacement(handlerCPU: hc, faultCPU: fc)
        let cross = BenchPlacement(handlerCPU: other, faultCPU: fc)
        var cases: [BenchCase] = []

        // Baselines.
        cases.append(BenchCase(name: "baseline.first-touch", group: "baselines", placement: "F\(fc)",
                               note: "first-touch write fault, fresh anon 4 KiB (no uffd)") {
            baseline("cubench_first_touch", cubench_first_touch, pages: n, placement: same)
        })
        cases.append(BenchCase(name: "baseline.populate-write", group: "baselines", placement: "F\(fc)",
                               note: "MADV_POPULATE_WRITE of fresh anon 4 KiB pages") {
            // The baseline of the primed 2 MiB bulk rows: primed too (its set-up is one mmap).
            let primed = o.prime ? cubench_prime_memory(UInt64(bulk) * 4096) : 0
            if primed < 0 {
                return .failure(BenchFailure(errno: -primed, operation: "baseline.populate-write: priming memory"))
            }
            return baseline("cubench_populate_write", cubench_populate_write, pages: bulk, placement: same)
        })
        cases.append(BenchCase(name: "baseline.memcpy-4k", group: "baselines", placement: "F\(fc)",
                               note: "memcpy of 4 KiB between populated buffers") {
            baseline("cubench_memcpy_4k", cubench_memcpy_4k, pages: bulk, placement: same)
        })

        // One fault per page, minimal C handler (the kernel's limit) and the project's C loop.
        for op in BenchOp.allCases {
            cases.append(BenchCase(name: "minimal.\(op.name)", group: "minimal C handler, 4 KiB per fault",
                                   baseline: "baseline.first-touch", placement: same.label,
                                   note: "poll + read one msg + one ioctl") {
                runUffdKernel(op: op, loop: false, pages: n, placement: same)
            })
        }
        for op in BenchOp.allCases {
            cases.append(BenchCase(name: "loop.\(op.name)", group: "cuffd_loop_run + C decide, 4 KiB per fault",
                                   baseline: "minimal.\(op.name)", placement: same.label,
                                   note: "the project's C fault loop; x = overhead vs minimal") {
                runUffdKernel(op: op, loop: true, pages: n, placement: same)
            })
        }

        // Bulk: one ioctl per window.
        // The 2 MiB COPY/MOVE rows are the baselines of file loads, which prime their memory
        // against free page reporting: these do too (CUBENCH_PRIME), so ratios compare like with like.
        let prime = o.prime ? UInt32(CUBENCH_PRIME.rawValue) : 0
        let thp2m = UInt32(CUBENCH_THP_SOURCE.rawValue | CUBENCH_THP_DEST.rawValue) | prime
        let nohuge2m = UInt32(CUBENCH_THP_SOURCE.rawValue | CUBENCH_NOHUGE_DEST.rawValue) | prime
        let bulkCases: [(String, BenchOp, UInt64, UInt32, String)] = [
            ("bulk.copy-64k", .copy, 64 << 10, 0, "COPY 64 KiB readahead window per fault"),
            ("bulk.copy-2m", .copy, 2 << 20, prime, "COPY 2 MiB window per fault"),
            ("bulk.continue-64k", .continue, 64 << 10, 0, "CONTINUE 64 KiB of shmem page cache per fault"),
            ("bulk.continue-2m", .continue, 2 << 20, 0, "CONTINUE 2 MiB of shmem page cache per fault"),
            ("bulk.move-2m-thp-dst", .move, 2 << 20, thp2m, "MOVE 2 MiB from a THP donor into a THP-eligible dst"),
            ("bulk.move-2m-nohuge-dst", .move, 2 << 20, nohuge2m, "MOVE 2 MiB from a THP donor into a MADV_NOHUGEPAGE dst"),
        ]
        for (name, op, window, flags, note) in bulkCases {
            cases.append(BenchCase(name: name, group: "bulk, minimal C handler", baseline: "baseline.populate-write",
                                   placement: same.label, note: note) {
                runUffdKernel(op: op, loop: false, pages: bulk, window: window, flags: flags, placement: same)
            })
        }

        // Placement: COPY 4 KiB, minimal handler.
        let placements: [(String, BenchPlacement)] = [
            ("place.copy.cross-cpu", cross),
            ("place.copy.2f-1h", BenchPlacement(handlerCPU: hc, faultCPU: fc, faultThreads: 2, spreadFaults: true)),
            ("place.copy.4f-1h", BenchPlacement(handlerCPU: hc, faultCPU: fc, faultThreads: 4, spreadFaults: true)),
            ("place.copy.1f-2h", BenchPlacement(handlerCPU: hc, faultCPU: fc, handlerThreads: 2, spreadHandlers: true)),
            ("place.copy.2f-2h", BenchPlacement(handlerCPU: hc, faultCPU: fc, faultThreads: 2, handlerThreads: 2,
                                                spreadHandlers: true, spreadFaults: true)),
            ("place.copy.4f-2h", BenchPlacement(handlerCPU: hc, faultCPU: fc, faultThreads: 4, handlerThreads: 2,
                                                spreadHandlers: true, spreadFaults: true)),
        ]
        for (name, pl) in placements {
            cases.append(BenchCase(name: name, group: "placement, COPY 4 KiB, minimal C handler",
                                   baseline: "minimal.copy", placement: pl.label,
                                   note: "wall time of all faulting threads / pages") {
                runUffdKernel(op: .copy, loop: false, pages: n, placement: pl)
            })
        }
        cases.append(BenchCase(name: "place.loop-copy.cross-cpu", group: "placement, COPY 4 KiB, minimal C handler",
                               baseline: "loop.copy", placement: cross.label, note: "the C loop, handler on the other CPU") {
            runUffdKernel(op: .copy, loop: true, pages: n, placement: cross)
        })

        cases += kitCases(o, placements: placements)
        cases += inThreadCases(o)
        cases += compactionCases(o)
        cases += fileCases(o)
        return cases
    }

    /// UffdKit rows: the minimal-C operations, bulk windows and placements again, decided by a
    /// Swift policy in a FaultHandler; each row's baseline is the C row of the same operation
    /// and placement, so its ratio is the Swift layer's cost.
    static func kitCases(_ o: BenchmarkOptions, placements: [(String, BenchPlacement)]) -> [BenchCase] {
        let n = o.effectivePages, bulk = o.effectiveBulkPages
        let ncpu = Int32(cubench_ncpus())
        let same = BenchPlacement(handlerCPU: o.handlerCPU % ncpu, faultCPU: o.faultCPU % ncpu)
        var cases: [BenchCase] = []
        let perFault: [(BenchOp, KitPolicyKind, String)] = [
            (.copy, .copy, "CopyPolicy(MemorySource)"), (.zeropage, .zeropage, "ZeroFillPolicy"),
            (.continue, .continue, "ContinuePolicy"), (.wp, .wp, "WriteTrackerPolicy"),
            (.move, .move(granule: 4096), "MovePolicy"),
        ]
        for (op, kind, policy) in perFault {
            cases.append(BenchCase(name: "kit.\(op.name)", group: "UffdKit: Swift policy in FaultHandler, 4 KiB per fault",
                                   baseline: "minimal.\(op.name)", placement: same.label,
                                   note: "\(policy); x = Swift layer vs minimal C", paired: true, repeats: 11) {
                runKitCase(kind, pages: n, placement: same)
            })
        }
        let bulkRows: [(String, KitPolicyKind, String, String)] = [
            ("kit.readahead-64k", .readahead(windowBytes: 64 << 10), "bulk.copy-64k", "ReadaheadPolicy(CopyPolicy), fixed 64 KiB"),
            ("kit.readahead-2m", .readahead(windowBytes: 2 << 20), "bulk.copy-2m", "ReadaheadPolicy(CopyPolicy), fixed 2 MiB"),
            ("kit.move-2m", .move(granule: 2 << 20), "bulk.move-2m-thp-dst", "MovePolicy, 2 MiB granule, THP donor and dst"),
        ]
        for (name, kind, base, note) in bulkRows {
            cases.append(BenchCase(name: name, group: "UffdKit: bulk", baseline: base, placement: same.label, note: note,
                                   paired: true, repeats: 11) {
                runKitCase(kind, pages: bulk, placement: same, prime: o.prime)
            })
        }
        for (name, pl) in placements {
            cases.append(BenchCase(name: "kit." + name, group: "UffdKit: placement, COPY 4 KiB", baseline: name,
                                   placement: pl.label, note: "CopyPolicy; x = vs the minimal C handler, same placement",
                                   paired: true) {
                runKitCase(.copy, pages: n, placement: pl)
            })
        }
        if let cross = placements.first(where: { $0.0 == "place.copy.cross-cpu" }) {
            cases.append(BenchCase(name: "kit.place.copy.cross-cpu.spin", group: "UffdKit: placement, COPY 4 KiB",
                                   baseline: cross.0, placement: cross.1.label,
                                   note: "CopyPolicy, handler on the other CPU busy-polling (spinPolls 10000)", paired: true) {
                runKitCase(.copy, pages: n, placement: cross.1, tuning: KitTuning(spinPolls: 10000))
            })
        }
        return cases
    }

    /// Heap compaction: compactor on `faultCPU`, mutators and their fault handler on the other
    /// CPU (or on the compactor's CPU in the "-samecpu" rows).
    static func compactionCases(_ o: BenchmarkOptions) -> [BenchCase] {
        let ncpu = Int32(cubench_ncpus())
        let cc = o.faultCPU % ncpu, otherCPU = (cc + 1) % ncpu
        let pages = o.effectiveCompactionPages
        var cases: [BenchCase] = []
        let modes: [(String, cubench_compact_mode)] = [
            ("copy", CUBENCH_COMPACT_COPY), ("move-fresh", CUBENCH_COMPACT_MOVE_FRESH),
            ("move-recycled", CUBENCH_COMPACT_MOVE_RECYCLED),
        ]
        // Mutators on the other CPU keep the mm live there: every MOVE then needs a TLB
        // shootdown IPI; the same-CPU variant shows the workload without them.
        for (mutators, batch, sameCPU) in [(UInt32(2), UInt32(1), false), (2, 16, false), (2, 1, true),
                                           (0, 1, false), (0, 16, false)] {
            let tag = "\(mutators)m-b\(batch)" + (sameCPU ? "-samecpu" : "")
            let mc = sameCPU ? cc : otherCPU
            for (mname, mode) in modes {
                let name = "compact.\(tag).\(mname)"
                let placement = mutators > 0 ? "C\(cc) M\(mc)x\(mutators) H\(mc)" : "C\(cc)"
                cases.append(BenchCase(name: name, group: "heap compaction (compacting thread time per to-space page)",
                                       baseline: mname == "copy" ? nil : "compact.\(tag).copy", placement: placement,
                                       note: "\(mutators) mutators, \(batch) page(s) per compactor ioctl") {
                    var p = cubench_compact_params()
                    p.to_pages = UInt64(pages)
                    p.mode = mode.rawValue
                    p.mutators = mutators
                    p.compactor_cpu = cc
                    p.mutator_cpu = mc
                    p.handler_cpu = mc
                    p.timeout_ms = 30000
                    p.batch_pages = batch
                    var r = cubench_compact_result()
                    let rc = cubench_compaction(&p, &r)
                    guard rc == 0 else {
                        return .failure(BenchFailure(errno: -rc, operation: "cubench_compaction(\(name))"))
                    }
                    return .success(BenchSample(ns: r.compactor_ns, pages: r.pages, counters: [
                        "handlerPages": Double(r.handler_pages), "mutatorFaults": Double(r.mutator_faults),
                        "mutatorReads": Double(r.mutator_reads), "compactorIoctls": Double(r.compactor_ioctls),
                        "tlbShootdowns": Double(r.tlb_shootdowns),
                    ]))
                })
            }
        }
        return cases
    }

    /// Lazy file load from tmpfs and disk: mmap (baseline) vs uffd pread+COPY vs pread alone.
    static func fileCases(_ o: BenchmarkOptions) -> [BenchCase] {
        let ncpu = Int32(cubench_ncpus())
        let fc = o.faultCPU % ncpu, hc = o.handlerCPU % ncpu
        let bytes = o.effectiveFileBytes
        var cases: [BenchCase] = []
        for dir in o.fileDirectories {
            let path = fileBenchPath(dir)
            let tmpfs = dir.hasPrefix("/dev/shm")
            let short = tmpfs ? "shm" : String(dir.split(separator: "/").last ?? "disk")
            // The first case of the directory that runs creates the file; the suite's teardown
            // removes it.
            let prepare: @Sendable () -> BenchFailure? = {
                if access(path, F_OK) == 0 { return nil }
                let rc = cubench_file_create(path, bytes)
                return rc == 0 ? nil : BenchFailure(errno: -rc, operation: "creating \(path)")
            }
            for cold in tmpfs ? [false] : [false, true] {
                let state = cold ? "cold" : "warm"
                let base = "file.\(short).\(state).mmap"
                let variants: [(String, cubench_load_mode, UInt64, String)] = [
                    ("mmap", CUBENCH_LOAD_MMAP, 0, "plain mmap of the file, read every page"),
                    ("uffd-64k", CUBENCH_LOAD_UFFD, 64 << 10, "uffd: pread 64 KiB + UFFDIO_COPY per fault"),
                    ("uffd-2m", CUBENCH_LOAD_UFFD, 2 << 20, "uffd: pread 2 MiB + UFFDIO_COPY per fault"),
                    ("pread-2m", CUBENCH_LOAD_PREAD, 2 << 20, "pread 2 MiB into a buffer, no mapping (I/O floor)"),
                ]
                for (vname, mode, window, note) in variants {
                    cases.append(fileCase(name: "file.\(short).\(state).\(vname)", bytes: bytes, path: path,
                                          baseline: vname == "mmap" ? nil : base, paired: false,
                                          note: note + (cold ? ", page cache dropped" : ""), prepare: prepare,
                                          mode: mode, window: window, cold: cold, hc: hc, fc: fc, prime: o.prime))
                }
                // Lazy loads at memory speed (issue 14), each interleaved with the row it is
                // judged against: the installer (pread into a huge-page donor, UFFDIO_MOVE, a
                // prefetch thread on the other CPU) and one-copy COPY from a mapping of the file.
                let pread = "file.\(short).\(state).pread-2m"
                let fresh = pread + "-fresh", fresh2t = pread + "-fresh-2t"
                let fast: [(String, cubench_load_mode, UInt32, UInt32, Bool, UInt32, String, String)] = [
                    // The physical limit: the bytes read once into fresh huge-page memory.
                    ("pread-2m-fresh", CUBENCH_LOAD_PREAD_FRESH, 0, 1, false, 0, pread,
                     "per window: MADV_POPULATE_WRITE of a fresh THP window, pread into it (fresh-memory limit)"),
                    ("pread-2m-fresh-2t", CUBENCH_LOAD_PREAD_FRESH, 0, 2, false, 0, pread,
                     "the same, 2 threads (CPUs 0 and 1) taking windows from a shared counter"),
                    ("install-2m", CUBENCH_LOAD_INSTALL, 1, 1, false, 0, pread,
                     "installer: pread into a THP donor + UFFDIO_MOVE, 1 prefetch thread"),
                    ("install-2m-nofill", CUBENCH_LOAD_INSTALL, 0, 1, false, 0, pread,
                     "installer without prefetch: pread + MOVE on the fault path only"),
                    ("install-2m-random-2t", CUBENCH_LOAD_INSTALL, 1, 2, true, 0, pread,
                     "installer, 2 faulting threads reading shuffled 2 MiB windows"),
                    ("install-copy-2m", CUBENCH_LOAD_INSTALL, 1, 1, false, UInt32(CUFFD_INSTALL_COPY.rawValue), pread,
                     "installer in COPY mode (no THP): pread into a donor + UFFDIO_COPY, 1 prefetch thread"),
                    ("mapcopy-2m", CUBENCH_LOAD_MAPCOPY, 0, 1, false, 0, "bulk.copy-2m",
                     "uffd: UFFDIO_COPY 2 MiB straight from a fresh mmap of the file (one copy)"),
                    ("mapcopy-pop-2m", CUBENCH_LOAD_MAPCOPY_POPULATED, 0, 1, false, 0, "bulk.copy-2m",
                     "uffd: UFFDIO_COPY 2 MiB from a mmap of the file, its page-cache pages mapped beforehand (the serve path)"),
                ]
                // The install rows also show their ratio to the fresh-memory limit with as many
                // CPUs (the prefetch thread or a second faulting thread uses CPU 1). (Filling the
                // donors by memcpy from a mapping of the file instead of pread, cubench_load_params
                // .fill_mapped, lost to pread by 1.4-1.5x on ext4 and tmpfs: not a row; BENCHMARKS.md.)
                let limits = ["install-2m": fresh2t, "install-2m-nofill": fresh, "install-2m-random-2t": fresh2t]
                for (vname, mode, fillers, threads, random, flags, baseline, note) in fast {
                    cases.append(fileCase(name: "file.\(short).\(state).\(vname)", bytes: bytes, path: path,
                                          baseline: baseline, paired: true, limit: limits[vname],
                                          note: note + (cold ? ", page cache dropped" : ""), prepare: prepare,
                                          mode: mode, window: 2 << 20, cold: cold, hc: hc, fc: fc,
                                          fillers: fillers, threads: threads, random: random, flags: flags,
                                          prime: o.prime))
                }
                // The same through UffdKit (Swift policy in a FaultHandler), interleaved with the
                // C row of the same path: the library's cost on top of the kernel's.
                let kits: [(String, KitFilePath, String, String)] = [
                    ("install-2m", .install(prefetch: 1), "file.\(short).\(state).install-2m",
                     "UffdKit InstallPolicy (WindowInstaller, 1 prefetch thread)"),
                    ("copy-mapped-2m", .copyMapped, "file.\(short).\(state).mapcopy-pop-2m",
                     "UffdKit ReadaheadPolicy(2 MiB) over CopyPolicy(FileSource .mapped): one copy"),
                ]
                for (vname, kind, baseline, note) in kits {
                    let name = "kit.file.\(short).\(state).\(vname)"
                    var pl = "H\(hc) F\(fc)"
                    if case .install(let n) = kind, n > 0 { pl += " P\((hc + 1) % ncpu)" }
                    cases.append(BenchCase(name: name, group: "lazy file load, \(bytes >> 20) MiB", baseline: baseline,
                                           placement: pl, note: note + (cold ? ", page cache dropped" : ""),
                                           prepare: prepare, paired: true) {
                        runKitFileLoad(kind, path: path, bytes: bytes, cold: cold, hc: hc, fc: fc, prime: o.prime)
                    })
                }
            }
        }
        return cases
    }
}

/// One lazy-file-load row.
func fileCase(name: String, bytes: UInt64, path: String, baseline: String?, paired: Bool, limit: String? = nil,
              note: String,
              prepare: @escaping @Sendable () -> BenchFailure?, mode: cubench_load_mode, window: UInt64,
              cold: Bool, hc: Int32, fc: Int32, fillers: UInt32 = 0, threads: UInt32 = 1, random: Bool = false,
              flags: UInt32 = 0, prime: Bool = true) -> BenchCase {
    let ncpu = Int32(cubench_ncpus())
    let uffd = mode != CUBENCH_LOAD_MMAP && mode != CUBENCH_LOAD_PREAD && mode != CUBENCH_LOAD_PREAD_FRESH
    var pl = uffd ? "H\(hc) F\(fc)" : "F\(fc)"
    if threads > 1 { pl += (1..<Int32(threads)).map { ",\((fc + $0) % ncpu)" }.joined() + "x\(threads)" }
    if fillers > 0 { pl += " P\((hc + 1) % ncpu)" }
    return BenchCase(name: name, group: "lazy file load, \(bytes >> 20) MiB", baseline: baseline, placement: pl,
                     note: note, prepare: prepare, paired: paired, limit: limit) {
        path.withCString { cpath in
            var p = cubench_load_params()
            p.path = cpath
            p.bytes = bytes
            p.mode = mode.rawValue
            p.drop_cache = cold ? 1 : 0
            p.window = window
            p.handler_cpu = hc
            p.fault_cpu = fc
            p.timeout_ms = 120000
            p.threads = threads
            p.random = random ? 1 : 0
            p.fillers = fillers
            p.filler_cpu = (hc + 1) % ncpu
            p.install_flags = flags
            p.no_prime = prime ? 0 : 1
            var r = cubench_result()
            let rc = cubench_file_load(&p, &r)
            guard rc == 0 else {
                return .failure(BenchFailure(errno: -rc, operation: "cubench_file_load(\(name))"))
            }
            var counters = ["faults": Double(r.faults)]
            if mode == CUBENCH_LOAD_INSTALL {
                counters["windows"] = Double(r.ioctls)
                counters["hugeMiB"] = Double(p.huge_bytes >> 20)
                // Where the installing threads' time went, ns per 4 KiB page (summed over threads).
                counters["allocNsPerPage"] = Double(p.alloc_ns) / Double(r.pages)
                counters["fillNsPerPage"] = Double(p.fill_ns) / Double(r.pages)
                counters["placeNsPerPage"] = Double(p.place_ns) / Double(r.pages)
            }
            if mode == CUBENCH_LOAD_MAPCOPY_POPULATED {
                counters["populateNsPerPage"] = Double(p.populate_ns) / Double(r.pages)
                counters["populatedMiB"] = Double(p.populated >> 20)
            }
            return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes, counters: counters))
        }
    }
}

/// The lazy-load file of this process in `dir`.
func fileBenchPath(_ dir: String) -> String { dir + "/uffdbench-\(getpid()).dat" }
