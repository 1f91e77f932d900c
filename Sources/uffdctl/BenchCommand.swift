import ArgumentParser
import Foundation
import UffdBench
import UffdKit

/// `uffdctl bench`: every operation on one workload in one run, against a first-touch
/// baseline measured in the same run (the UffdBench suite plus UffdKit session rows).
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmark every operation in one run: ns per 4 KiB page, GB/s, ratio to first-touch.",
        discussion: """
            Runs the UffdBench suite (baselines, minimal C handlers, the C fault loop, bulk \
            windows, placement, heap compaction, lazy file load) and the UffdKit session rows \
            (the Swift policies through FaultHandler: copy, zeropage, move, continue, \
            write-protect, WP_ASYNC), each at least 5 times; min and median ns per 4 KiB page, \
            GB/s, and the ratio to the row's baseline measured in the same run (the UffdKit rows \
            against baseline.first-touch). Threads are pinned: the faulting thread on \
            --fault-cpu, the handler on --handler-cpu (the same CPU by default; cross-CPU \
            wakeups are slow on VMs). `make bench` runs `uffdctl bench --full`.
            """ + exitCodesHelp
    )

    @Flag(help: "Full run: 4x the pages and 1 GiB files (quick otherwise).")
    var full = false

    @Flag(help: "Print the report as one JSON object on stdout.")
    var json = false

    @Flag(help: "No progress line on stderr (shown only when stderr is a terminal).")
    var quiet = false

    @Option(help: "Measured runs per case (at least 5 are used).")
    var repeats: Int = 5

    @Option(help: "4 KiB pages per run of the one-fault-per-page cases (default 4096, --full 16384).")
    var pages: Int?

    @Option(name: .customLong("bulk-pages"), help: "4 KiB pages per run of the bulk cases (default 16384, --full 65536).")
    var bulkPages: Int?

    @Option(name: .customLong("file-size"), help: ArgumentHelp("Size of the lazily loaded file (default 256M, --full 1G).", valueName: "size"))
    var fileSize: String?

    @Option(name: .customLong("file-dir"), help: "Directory for the lazy-load file (repeatable; default /dev/shm and /var/tmp).")
    var fileDirs: [String] = []

    @Option(help: "Keep only cases whose name contains this (repeatable or comma-separated; baselines they need are kept).")
    var filter: [String] = []

    @Option(name: .customLong("fault-cpu"), help: "CPU of the faulting thread.")
    var faultCPU: Int32 = 0

    @Option(name: .customLong("handler-cpu"), help: "CPU of the handler thread.")
    var handlerCPU: Int32 = 0

    @Flag(name: .customLong("no-warmup"), help: "Skip the untimed warm-up run of each case.")
    var noWarmup = false

    @Flag(name: .customLong("no-uffdkit"), help: "Only the UffdBench suite, without the UffdKit session rows.")
    var noUffdKit = false

    @Flag(name: .customLong("no-prime"), help: "Do not prime free memory before the file and 2 MiB bulk rows (shows the cost of free page reporting).")
    var noPrime = false

    func run() throws {
        guard repeats >= 1, repeats <= 1000 else { throw CLIError.usage("--repeats must be 1...1000") }
        if let pages, pages < 1 || pages > 1 << 22 { throw CLIError.usage("--pages must be 1...\(1 << 22)") }
        if let bulkPages, bulkPages < 1 || bulkPages > 1 << 22 { throw CLIError.usage("--bulk-pages must be 1...\(1 << 22)") }
        let cpus = Int32(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        for (name, cpu) in [("--fault-cpu", faultCPU), ("--handler-cpu", handlerCPU)] where cpu < 0 || cpu >= cpus {
            throw CLIError.usage("\(name) \(cpu): this machine has CPUs 0...\(cpus - 1)")
        }
        let fileBytes = try fileSize.map { s throws(CLIError) in UInt64(try parseSize(s, option: "--file-size")) }
        for dir in fileDirs {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue,
                  access(dir, W_OK) == 0 else {
                throw CLIError.usage("--file-dir \(dir) is not a writable directory")
            }
        }
        var options = BenchmarkOptions(full: full, repeats: repeats, pages: pages, bulkPages: bulkPages,
                                       fileBytes: fileBytes, warmup: !noWarmup,
                                       filter: filter.flatMap { $0.split(separator: ",").map(String.init) },
                                       json: json, faultCPU: faultCPU, handlerCPU: handlerCPU)
        if !fileDirs.isEmpty { options.fileDirectories = fileDirs }
        options.prime = !noPrime

        var suite = BenchmarkSuite(options: options)
        if !noUffdKit {
            for op in SessionBenchOp.allCases {
                suite.add(sessionCase(op, pages: options.effectivePages, handlerCPU: handlerCPU, faultCPU: faultCPU))
            }
        }
        let selected = suite.selectedCases.count
        guard selected > 0 else { throw CLIError.usage("--filter \(filter.joined(separator: ",")) matches no case") }
        var done = 0
        // Progress on a terminal only: the case about to run, overwritten in place.
        let showProgress = !quiet && isatty(STDERR_FILENO) == 1
        let report = suite.run { name in
            done += 1
            if showProgress { FileHandle.standardError.write(Data("\r\u{1B}[K[\(done)/\(selected)] \(name)".utf8)) }
        }
        if showProgress { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
        print(json ? report.json : report.table, terminator: json ? "\n" : "")
        let failed = report.results.filter { !$0.unsupported && ($0.runs == 0 || $0.failures > 0) }
        if !failed.isEmpty {
            throw CLIError.failed("\(failed.count) case(s) failed: " + failed.map(\.name).joined(separator: ", "))
        }
    }
}

/// The UffdKit session rows of `uffdctl bench`.
enum SessionBenchOp: String, CaseIterable, Sendable {
    case copy, zeropage, move, `continue`, wp, wpAsync = "wp-async"

    var note: String {
        switch self {
        case .copy: "CopyPolicy (in-memory image) through FaultHandler, anon"
        case .zeropage: "ZeroFillPolicy through FaultHandler, anon"
        case .move: "MovePolicy from a DONTFORK donor through FaultHandler, anon"
        case .continue: "ContinuePolicy through FaultHandler, shmem page cache filled via the alias"
        case .wp: "WriteTrackerPolicy: log + unprotect per first write, anon"
        case .wpAsync: "AsyncWriteTracker: WP_ASYNC writes + one PAGEMAP_SCAN, anon"
        }
    }
}

/// A bench case running one verified UffdKit session of `pages` pages, one pinned worker.
func sessionCase(_ op: SessionBenchOp, pages: Int, handlerCPU: Int32, faultCPU: Int32) -> BenchCase {
    BenchCase(name: "uffdkit.\(op.rawValue)", group: "UffdKit sessions (Swift policy, FaultHandler), 4 KiB per fault",
              baseline: "baseline.first-touch", placement: op == .wpAsync ? "F\(faultCPU)" : "H\(handlerCPU) F\(faultCPU)",
              note: op.note) {
        do throws(CLIError) {
            return .success(try benchSession(op, pages: pages, handlerCPU: handlerCPU, faultCPU: faultCPU))
        } catch {
            var f = BenchFailure(errno: error.exitCode == .notAllowed ? EOPNOTSUPP : EIO, operation: error.message)
            f.unsupported = error.exitCode == .notAllowed
            return .failure(f)
        }
    }
}

/// One session: map, register, handler pinned on `handlerCPU`, one worker pinned on
/// `faultCPU` touching every page in order, then every byte verified.
func benchSession(_ op: SessionBenchOp, pages: Int, handlerCPU: Int32, faultCPU: Int32) throws(CLIError) -> BenchSample {
    let size = pages * basePageSize
    let memory: MemoryType = op == .continue ? .shmem : .anon
    let region = try SessionSteps.map(memory, length: size)
    var expected = ExpectedContent.pattern(seed: 0x5EED)
    var actions = uniformActions(pages: pages, write: false)
    var keep: [AnyObject] = []
    let uffd: Userfaultfd?
    let policy: (any FaultPolicy)?
    switch op {
    case .copy:
        uffd = try SessionSteps.open(features: [])
        try SessionSteps.register(uffd!, region, modes: .missing, needed: .copy, memory: memory)
        // From a populated image, as the minimal C handler does: the row measures the fault
        // path, not generating the bytes.
        let image = MemorySource(length: size) { fillPattern($0.baseAddress!, offset: 0, count: size) }
        policy = CopyPolicy(region: region, source: image)
    case .zeropage:
        uffd = try SessionSteps.open(features: [])
        try SessionSteps.register(uffd!, region, modes: .missing, needed: .zeropage, memory: memory)
        policy = ZeroFillPolicy(region: region)
        expected = .zero
    case .move:
        let donor: MappedRegion
        do { donor = try MappedRegion.donor(length: size) } catch { throw cliError(error, what: "donor") }
        fillPattern(donor.pointer, offset: 0, count: size)
        uffd = try SessionSteps.open(features: .move)
        try SessionSteps.register(uffd!, region, modes: .missing, needed: .move, memory: memory)
        do { policy = try MovePolicy(region: region, donor: donor) } catch { throw cliError(error, what: "move policy") }
    case .continue:
        fillPattern(region.alias!, offset: 0, count: size)
        uffd = try SessionSteps.open(features: .minorShmem)
        try SessionSteps.register(uffd!, region, modes: .minor, needed: .continue, memory: memory)
        do { policy = try ContinuePolicy(region: region) } catch { throw cliError(error, what: "continue policy") }
    case .wp:
        fillPattern(region.pointer, offset: 0, count: size)
        uffd = try SessionSteps.open(features: .pagefaultFlagWP)
        try SessionSteps.register(uffd!, region, modes: .writeProtect, needed: .writeProtect, memory: memory)
        let tracker = WriteTrackerPolicy(region: region)
        do { try tracker.arm(uffd!) } catch { throw cliError(error, what: "write-protect") }
        policy = tracker
        actions = uniformActions(pages: pages, write: true)
    case .wpAsync:
        fillPattern(region.pointer, offset: 0, count: size)
        do { keep.append(try AsyncWriteTracker(region: region)) } catch { throw cliError(error, what: "WP_ASYNC") }
        uffd = nil
        policy = nil
        actions = uniformActions(pages: pages, write: true)
    }
    var handler: FaultHandler?
    if let uffd, let policy {
        var o = FaultHandler.Options()
        o.cpus = [Int(handlerCPU)]
        o.threadName = "uffdctl-bench"
        let h = FaultHandler(uffd: uffd, policy: policy, options: o)
        do { try h.start() } catch { throw cliError(error, what: "handler") }
        handler = h
    }
    defer { handler?.stop() }
    let workload = Workload(base: region.address, length: size, threads: 1, order: .seq, actions: actions, pin: faultCPU)
    let outcome = try workload.run(timeout: 60, progress: ProgressBar(quiet: true, total: pages, label: ""))
    var ns = outcome.seconds * 1e9
    if op == .wpAsync, let tracker = keep.first as? AsyncWriteTracker {
        // The dirty-page read is part of the cost of async tracking.
        let t0 = DispatchTime.now().uptimeNanoseconds
        let dirty: Int
        do { dirty = try tracker.collectPageCount(reprotect: true) } catch { throw cliError(error, what: "PAGEMAP_SCAN") }
        ns += Double(DispatchTime.now().uptimeNanoseconds - t0)
        guard dirty == pages else { throw .failed("uffdkit.wp-async: \(dirty) dirty pages, \(pages) written") }
    }
    let v = try verifyRegion(base: region.address, length: size, expected: expected, actions: actions)
    guard v.ok else { throw .failed("uffdkit.\(op.rawValue): verification failed (\(v.mismatchedPages) pages differ)") }
    handler?.stop()
    let faults = handler?.stats().faults ?? 0
    return BenchSample(ns: UInt64(ns), pages: UInt64(pages), bytes: UInt64(size), counters: ["faults": Double(faults)])
}
