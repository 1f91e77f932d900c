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
                pageSource = try FileSource(path: path)
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
        var plan = SessionPlan("copy", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory), modes: .missing, needed: .copy,
            policy: { s in
                let range = ServedRange(region: s.region)
                served = range
                let inner = CopyPolicy(range: range, source: pageSource)
                if let failing {
                    let policy: any FaultPolicy = window.map { ReadaheadPolicy(inner, window: $0) } ?? inner
                    return try ws.wrap(FailingPolicy(failing: Set(failing.map { s.region.address + UInt($0 * pageSize) }),
                                                     pageSize: pageSize, otherwise: policy), range: range)
                }
                if let window { return try ws.wrap(ReadaheadPolicy(inner, window: window), range: range) }
                return try ws.wrap(inner, range: range)
            }), expected: expected)
        plan.armed = { s in if let served { try ws.armed(s, range: served, source: pageSource) } }
        let source = self.source
        let actions = plan.actions
        plan.finish = { ctx, notes in
            try ws.finish(&notes, used: { page in
                let first = page * pageSize / basePageSize
                return (first..<min(actions.count, first + pageSize / basePageSize)).contains { actions[$0] != .skip }
            })
            let ra = readaheadName(window, pageSize: pageSize)
            notes.details["source"] = .string(source)
            notes.details["readahead"] = .string(ra)
            var line = "source       \(source), readahead \(ra)"
            if case .file = parsed {
                notes.details["file_bytes"] = .int(fileLength)
                line += " (file \(fileLength) bytes, region \(size) bytes, tail \(size - fileLength) bytes zero)"
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
