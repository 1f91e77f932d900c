import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl copy`: lazy loading with UFFDIO_COPY from a zero, pattern or file source.
struct CopyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "copy",
        abstract: "Lazy loading with UFFDIO_COPY: missing faults are filled from a source.",
        discussion: """
            Maps the region, registers it for missing faults, and serves each fault by copying \
            the page (or a readahead window) from the source. With --source file:PATH the \
            region is the file's size rounded up to the page; the file is loaded lazily and \
            every byte is compared with the file afterwards (the tail past its end must be zero). \
            A packed snapshot (file:PATH) or a URL (http(s)://, s3://BUCKET/KEY with AWS_* \
            credentials and --endpoint for S3-compatible stores) is read in cached chunks; \
            its size decides the region and every byte is compared with a second, independent \
            read of the source. \
            A raw file on anon memory is installed 2 MiB window at a time by default \
            (--install auto: read once into a huge-page donor and moved into place with \
            UFFDIO_MOVE where THP can back the region, else copied from the donor; \
            --install-prefetch N threads install ahead of a stream); the report gives the windows and the bytes \
            backed by huge pages. --install off, or an explicit --readahead, keeps the \
            per-fault copy path. \
            Default session: 64 MiB anon, pattern source, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    @Option(help: ArgumentHelp("Where pages come from: zero, pattern, file:PATH (raw or packed snapshot), http(s)://URL or s3://BUCKET/KEY.",
                               valueName: "source"))
    var source: String = "pattern"

    @OptionGroup var remote: RemoteSourceOptions

    @Option(help: ArgumentHelp("Pages resolved per fault: a size (e.g. 64K, a multiple of the page size) or adaptive.",
                               valueName: "size|adaptive"))
    var readahead: String?

    @Option(help: ArgumentHelp("Whole-window installs (2 MiB): auto (raw file sources on anon memory, unless --readahead, --in-thread or a working-set option is given), move (UFFDIO_MOVE of a huge-page donor, anon memory), copy (UFFDIO_COPY from the donor, anon or shmem) or off.",
                               valueName: "auto|move|copy|off"))
    var install: InstallChoice = .auto

    @Option(name: .customLong("file-read"),
            help: ArgumentHelp("How the per-fault copy path and --prefetch read a raw file: mmap (UFFDIO_COPY straight from a read-only mapping of the file: one copy; the pages of the file in the page cache, all of a file in tmpfs, are mapped at start) or pread (a read into a buffer, then the copy: two copies). The installer always reads with pread into its donor.",
                               valueName: "mmap|pread"))
    var fileRead: String = "mmap"

    @Option(name: .customLong("install-prefetch"),
            help: ArgumentHelp("Threads installing the windows ahead of a sequential stream (0...4; they overlap reading with installing when a CPU is free).", valueName: "n"))
    // 0 by default: on a shared 2-CPU machine a prefetch thread's donor population stalled in
    // some runs (BENCHMARKS.md, "Lazy loads at memory speed"); the fault path alone was steady.
    var installPrefetch: Int = 0

    @Option(name: .customLong("record-working-set"),
            help: ArgumentHelp("Record the order of first faults (page offset, time) to this file when the session ends.", valueName: "file"))
    var recordWorkingSet: String?

    @Option(name: .customLong("prefetch"),
            help: ArgumentHelp("Install the pages of this recorded working set ahead of the faults, on a background thread (faults keep priority).",
                               valueName: "file"))
    var prefetch: String?

    @Option(name: .customLong("prefetch-batch"),
            help: ArgumentHelp("Bytes the prefetch installs per batch (one WAKE each; default 256K).", valueName: "size"))
    var prefetchBatch: String?

    @Flag(name: .customLong("in-thread"),
          help: "Resolve each fault in the faulting thread (UFFD_FEATURE_SIGBUS), with no handler thread.")
    var inThread = false

    @Option(name: .customLong("fail-pages"),
            help: ArgumentHelp("Testing: the policy throws for these page indexes (comma-separated), to show the fallback and exit 1.",
                               visibility: .hidden))
    var failPages: String?

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        let pageSize = memory.pageSize
        var parsed = try CopySource(parsing: source)
        if case .file(let path) = parsed, (try? PageSources.isPackedFile(path)) == true { parsed = .named(source) }
        let isFile: Bool
        if case .file = parsed { isFile = true } else { isFile = false }
        let installMode = try install.resolve(memory: memory, rawFile: isFile, readahead: readahead != nil,
                                              inThread: inThread, workingSet: recordWorkingSet != nil || prefetch != nil,
                                              failPages: failPages != nil)
        guard fileRead == "mmap" || fileRead == "pread" else {
            throw CLIError.usage("--file-read '\(fileRead)': use mmap or pread")
        }
        guard (0...4).contains(installPrefetch) else {
            throw CLIError.usage("--install-prefetch \(installPrefetch): use 0 to 4 threads")
        }
        // Remote and packed sources (PageSources.open); raw files keep the pread path below.
        var named: (any PageSource)?
        if case .named(let spec) = parsed { named = try remote.open(spec) }

        let size: Int
        var fileLength = 0
        var fileFD: Int32 = -1
        if case .file(let path) = parsed {
            guard session.size == nil else {
                throw CLIError.usage("--size cannot be combined with --source file: (the file's size decides the region)")
            }
            (fileFD, fileLength) = try openInputFile(path)
            size = (fileLength + pageSize - 1) / pageSize * pageSize
            try session.checkRegionSize(size, pageSize: pageSize)
        } else if let named {
            guard session.size == nil else {
                throw CLIError.usage("--size cannot be combined with --source \(source) (the image's size decides the region)")
            }
            guard named.length > 0 else { throw CLIError.usage("--source \(source) is empty: nothing to load") }
            size = (named.length + pageSize - 1) / pageSize * pageSize
            try session.checkRegionSize(size, pageSize: pageSize)
        } else {
            size = try session.regionSize(pageSize: pageSize)
        }
        defer { if fileFD >= 0 { close(fileFD) } }
        try session.checkHugePages(size)
        let window = try readaheadWindow(readahead, pageSize: pageSize)

        let pageSource: any PageSource
        let expected: ExpectedContent
        switch parsed {
        case .zero:
            pageSource = ZeroSource(length: size)
            expected = .zero
        case .pattern:
            pageSource = PatternSource(length: size)
            expected = .pattern(seed: 0x5EED)
        case .file(let path):
            do {
                // The installer reads its windows with pread: populating the mapping up front
                // would only pay for the few faults it leaves to the copy path.
                pageSource = try FileSource(path: path, access: fileRead == "mmap" ? .mapped : .pread,
                                            populate: installMode == nil)
            } catch {
                throw CLIError.usage("--source file:\(path): cannot read the file: \(error.errno)")
            }
            expected = .file(fd: fileFD, length: fileLength)
        case .named(let spec):
            pageSource = named!
            // Verified against a second, independent open (its own cache and fetches).
            expected = .source(try remote.open(spec))
        }
        let failing = try failPages.map { list throws(CLIError) in
            try list.split(separator: ",").map { t throws(CLIError) -> Int in
                guard let n = Int(t), n >= 0, n < size / pageSize else { throw .usage("--fail-pages: bad page index '\(t)'") }
                return n
            }
        }

        if inThread && (recordWorkingSet != nil || prefetch != nil) {
            throw CLIError.usage("--in-thread cannot be combined with --record-working-set or --prefetch (they need the handler thread); drop --in-thread")
        }
        let ws = try WorkingSetSession(record: recordWorkingSet, prefetch: prefetch, batch: prefetchBatch,
                                       source: pageSource, size: size, pageSize: pageSize)
        var served: ServedRange?
        var installPolicy: InstallPolicy?
        let prefetchThreads = installPrefetch
        let prefetchCPUs = installPrefetchCPUs(pin: session.pin)
        var plan = SessionPlan("copy", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory), modes: .missing, needed: .copy,
            policy: { s in
                let range = ServedRange(region: s.region)
                served = range
                if let installMode, let uffd = s.uffd {
                    let p = InstallPolicy(range: range, uffd: uffd, source: pageSource, mode: installMode,
                                          prefetchThreads: prefetchThreads, prefetchCPUs: prefetchCPUs,
                                          copyWindow: window)
                    installPolicy = p
                    return p
                }
                let inner = CopyPolicy(range: range, source: pageSource)
                if let failing {
                    let policy: any FaultPolicy = window.map { ReadaheadPolicy(inner, window: $0) } ?? inner
                    return try ws.wrap(FailingPolicy(failing: Set(failing.map { s.region.address + UInt($0 * pageSize) }),
                                                     pageSize: pageSize, otherwise: policy), range: range)
                }
                if let window { return try ws.wrap(ReadaheadPolicy(inner, window: window), range: range) }
                return try ws.wrap(inner, range: range)
            }), expected: expected)
        // A huge page can back the whole region only if it starts on a 2 MiB boundary; the
        // installer's windows start at the first boundary.
        plan.thpAligned = installMode != nil && memory == .anon
        if memory == .anon, installMode == .automatic || installMode == .move {
            // Ask for huge pages (THP "madvise" is the common setting): the moved windows are
            // huge pages only in a MADV_HUGEPAGE (or THP "always") region. THP "never" still
            // wins, and a kernel without THP refuses the advice (EINVAL): either way the
            // installer finds the region not THP-eligible and copies the windows from the donor.
            plan.prepare = { region in try? region.advise(MADV_HUGEPAGE) }
        }
        plan.reportHugePages = true
        plan.armed = { s in if let served { try ws.armed(s, range: served, source: pageSource) } }
        let source = self.source
        let actions = plan.actions
        plan.finish = { ctx, notes in
            try ws.finish(&notes, used: { page in
                let first = page * pageSize / basePageSize
                return (first..<min(actions.count, first + pageSize / basePageSize)).contains { actions[$0] != .skip }
            })
            // With the installer, the faults it does not take get its copy path's window
            // (--readahead, else adaptive up to a window).
            let ra = readaheadName(installPolicy.map { $0.copyPath.window } ?? window, pageSize: pageSize)
            notes.details["source"] = .string(source)
            notes.details["readahead"] = .string(ra)
            var line = "source       \(source), readahead \(ra)"
            if installPolicy == nil { notes.details["install"] = .object(["mode": "off"]) }
            if case .file = parsed {
                notes.details["file_bytes"] = .int(fileLength)
                line += " (file \(fileLength) bytes, region \(size) bytes, tail \(size - fileLength) bytes zero)"
                if let fs = pageSource as? FileSource {
                    notes.details["file_read"] = .string(fs.access == .mapped ? "mmap" : "pread")
                    notes.details["file_populated_bytes"] = .int(fs.populatedBytes)
                    line += ", file read \(fs.access == .mapped ? "mmap" : "pread")"
                }
            }
            if let chunked = pageSource as? ChunkedSource {
                let c = chunked.counters
                notes.details["image_bytes"] = .int(chunked.length)
                notes.details["packed"] = .bool(chunked.isPacked)
                notes.details["region_fnv64"] = .string(String(PageSources.fingerprint(
                    UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: ctx.region.address), count: chunked.length)), radix: 16))
                notes.details["chunk_hits"] = .int(Int(c.hits))
                notes.details["chunk_misses"] = .int(Int(c.misses))
                notes.details["chunk_joined"] = .int(Int(c.joined))
                notes.details["requests"] = .int(Int(c.requests))
                notes.details["retries"] = .int(Int(c.retries))
                notes.details["fetched_bytes"] = .int(Int(c.bytes))
                line += " (\(chunked.isPacked ? "packed, " : "")image \(chunked.length) bytes; chunks: \(c.hits) hits, "
                    + "\(c.misses) fetched, \(c.joined) joined; \(c.requests) requests, \(c.retries) retries)"
            }
            notes.lines.append(line)
        }
        plan.stopped = { notes in
            guard let installPolicy else { return }
            // The load is over: the filler threads end here; with the handler's threads
            // stopped too, no install is still adding to the counters it woke before.
            installPolicy.stopPrefetching()
            reportInstall(installPolicy, into: &notes)
        }
        if inThread { plan.handling = try inThreadHandling(parsed, size: size, fileFD: fileFD, window: window) }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }
}

/// The copy source named on the command line.
enum CopySource {
    case zero
    case pattern
    case file(String)
    /// A URL or a packed snapshot, opened with PageSources.open.
    case named(String)

    init(parsing text: String) throws(CLIError) {
        switch text {
        case "zero": self = .zero
        case "pattern": self = .pattern
        default:
            if text.hasPrefix("http://") || text.hasPrefix("https://") || text.hasPrefix("s3://") {
                self = .named(text)
                return
            }
            guard text.hasPrefix("file:") else {
                throw .usage("--source '\(text)': use zero, pattern or file:PATH (raw or packed), or a URL (http(s)://... or s3://BUCKET/KEY)")
            }
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw .usage("--source file: needs a path (file:PATH)") }
            self = .file(path)
        }
    }
}

/// Opens a regular, non-empty, readable file; returns its fd and size.
func openInputFile(_ path: String) throws(CLIError) -> (Int32, Int) {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw .usage("cannot read \(path): \(errnoName(errno))") }
    var st = stat()
    guard fstat(fd, &st) == 0 else {
        let e = errno
        close(fd)
        throw .usage("cannot stat \(path): \(errnoName(e))")
    }
    guard st.st_mode & S_IFMT == S_IFREG else {
        close(fd)
        throw .usage("\(path) is not a regular file")
    }
    guard st.st_size > 0 else {
        close(fd)
        throw .usage("\(path) is empty: nothing to load")
    }
    // A directory or unreadable device would fail here rather than in the handler.
    var probe: UInt8 = 0
    if pread(fd, &probe, 1, 0) < 0 {
        let e = errno
        close(fd)
        throw .usage("cannot read \(path): \(errnoName(e))")
    }
    return (fd, Int(st.st_size))
}

/// nil (one page per fault), a fixed window, or the adaptive window.
func readaheadWindow(_ text: String?, pageSize: Int) throws(CLIError) -> ReadaheadPolicy<CopyPolicy>.Window? {
    guard let text else { return nil }
    if text == "adaptive" { return .adaptive(minPages: 1, maxPages: max(4, (2 << 20) / pageSize)) }
    let bytes = try parseSize(text, option: "--readahead")
    guard bytes % pageSize == 0 else {
        throw .usage("--readahead \(text) is not a multiple of the page size (\(pageSize) bytes)")
    }
    guard bytes <= 64 << 20 else { throw .usage("--readahead \(text) is larger than 64 MiB") }
    return bytes == pageSize ? nil : .fixed(pages: bytes / pageSize)
}

func readaheadName(_ w: ReadaheadPolicy<CopyPolicy>.Window?, pageSize: Int) -> String {
    switch w {
    case nil: "none"
    case .fixed(let n): formatBytes(n * pageSize)
    case .adaptive(let lo, let hi): "adaptive (\(formatBytes(lo * pageSize))...\(formatBytes(hi * pageSize)))"
    }
}

/// Testing aid: throws for chosen pages (the handler's fallback then resolves them and reports
/// the failure), asks `otherwise` for the rest.
final class FailingPolicy: FaultPolicy {
    struct Injected: Error, CustomStringConvertible {
        var address: UInt
        var description: String { "injected failure at 0x\(String(address, radix: 16))" }
    }
    let failing: Set<UInt>
    let pageSize: Int
    let otherwise: any FaultPolicy
    init(failing: Set<UInt>, pageSize: Int, otherwise: any FaultPolicy) {
        self.failing = failing
        self.pageSize = pageSize
        self.otherwise = otherwise
    }
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let page = fault.address & ~UInt(pageSize - 1)
        if failing.contains(page) { throw Injected(address: page) }
        return try otherwise.resolve(fault, context: context)
    }
    var scratchBytes: Int { otherwise.scratchBytes }
}

/// `--install`: whether the window installer (``InstallPolicy``) serves the session.
enum InstallChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, move, copy, off

    /// The policy's mode, or nil for the per-fault copy path. `auto` takes the fast path where
    /// it applies without being asked (a raw file loaded into anon memory by the handler) and
    /// stays off where the user chose a per-fault tool (--readahead, --in-thread, working sets,
    /// --fail-pages); an explicit choice that cannot apply is a usage error.
    func resolve(memory: MemoryType, rawFile: Bool, readahead: Bool, inThread: Bool, workingSet: Bool,
                 failPages: Bool) throws(CLIError) -> InstallPolicy.Mode? {
        switch self {
        case .off:
            return nil
        case .auto:
            return rawFile && memory == .anon && !readahead && !inThread && !workingSet && !failPages ? .automatic : nil
        case .move, .copy:
            let name = "--install \(rawValue)"
            if inThread { throw .usage("\(name) cannot be combined with --in-thread (the installer needs the handler thread); drop one") }
            if workingSet { throw .usage("\(name) cannot be combined with --record-working-set or --prefetch (they work page by page); use --install off") }
            if failPages { throw .usage("\(name) cannot be combined with --fail-pages; use --install off") }
            switch memory {
            case .anon: break
            case .shmem, .shmemPrivate:
                if self == .move { throw .usage("--install move needs --memory anon (UFFDIO_MOVE moves private anonymous pages); use --install copy") }
            case .hugetlb, .hugetlbPrivate:
                throw .usage("\(name) does not apply to hugetlb memory (its pages are already huge); use --install off")
            }
            return self == .move ? .move : .copy
        }
    }
}

/// The prefetch threads' CPUs: beside the pinned session (the next CPU), else not pinned.
func installPrefetchCPUs(pin: Int32?) -> [Int32] {
    guard let pin else { return [] }
    let cpus = Int32(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    return cpus > 1 ? [(pin + 1) % cpus] : []
}

/// The installer's counters in the report: JSON `install` and one summary line. Its installed
/// bytes count as resolved (the handler's resolutions do not see them: the installer wakes the
/// windows itself).
func reportInstall(_ p: InstallPolicy, into notes: inout SessionNotes) {
    let s = p.stats
    let mode: String
    switch p.installer?.mode {
    case .move?: mode = "move"
    case .copy?: mode = "copy"
    case nil: mode = "unavailable"
    }
    var object: [String: JSONValue] = [
        "mode": .string(mode), "moved": .int(s.moved), "copied": .int(s.copied), "fallbacks": .int(s.fallbacks),
        "prefetched": .int(s.prefetched), "joined": .int(s.joined), "stale": .int(s.stale), "failed": .int(s.failed),
        "bytes": .int(s.bytes), "window": .int(p.installer?.window ?? 0), "windows": .int(p.installer?.windows ?? 0),
        // Where the installing threads' time went (summed over them): populating donors,
        // reading the image into them, moving/copying them into place.
        "alloc_ns": .int(Int(s.allocNs)), "fill_ns": .int(Int(s.fillNs)), "place_ns": .int(Int(s.placeNs)),
    ]
    if let why = p.fastPathUnavailable { object["note"] = .string(why) }
    notes.details["install"] = .object(object)
    notes.resolvedBytes += UInt64(s.bytes)
    var line = "install      \(mode)"
    if let i = p.installer {
        line += ", \(formatBytes(i.window)) windows: \(s.moved) moved, \(s.copied) copied (\(s.fallbacks) after a failed move), "
            + "\(s.prefetched) prefetched, \(s.joined) joined, \(s.stale) single pages, \(s.failed) failed"
    }
    if let why = p.fastPathUnavailable { line += " (\(why))" }
    notes.lines.append(line)
}
