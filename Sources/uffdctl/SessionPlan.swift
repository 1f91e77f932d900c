import Foundation
import UffdKit

/// What one session subcommand contributes; ``SessionRunner`` does the rest (map, register,
/// start the handler, run the workload, verify, stop, report). A new subcommand or option
/// fills in a plan; the steps it shares with the others are not repeated.
struct SessionPlan {
    /// How the session's faults are resolved.
    enum Handling {
        /// A userfaultfd with `features`; the region registered for `modes` (the range must
        /// offer `needed`); a ``FaultHandler`` running the policy the factory makes.
        case handler(features: Features, modes: RegisterMode, needed: Ioctls,
                     policy: (SessionContext) throws -> any FaultPolicy)
        /// No userfaultfd handler: the kernel resolves the faults itself (e.g. WP_ASYNC).
        case kernel
        /// No handler thread: the faulting threads resolve their own faults (`--in-thread`,
        /// UFFD_FEATURE_SIGBUS and ``InThreadResolver``, see InThreadSession.swift); `unit` is
        /// the bytes of one resolution (nil: the region's page).
        case inThread(features: Features, modes: RegisterMode, needed: Ioctls, unit: Int?,
                      policy: (SessionContext) throws -> InThreadResolver.Policy)
    }

    /// The report's `operation` and the progress bar's label.
    var operation: String
    var memory: MemoryType
    /// Region bytes (already validated against the options).
    var size: Int
    /// The page size the report names (the memory's, or e.g. MOVE's granule).
    var pageSize: Int
    /// Anonymous memory aligned to 2 MiB so THP can back it.
    var thpAligned = false
    var handling: Handling
    /// What the workers do to each base page.
    var actions: [PageAction]
    /// What the region must hold afterwards (before the writers' markers).
    var expected: ExpectedContent
    /// How the report names `expected` ("the pattern").
    var expectedName: String
    /// Whether the report calls the workload a write (defaults to --write).
    var write: Bool
    /// Report the bytes of the region backed by huge pages after the workload (JSON
    /// `huge_page_bytes`, PAGEMAP_SCAN with PAGE_IS_HUGE: transparent huge pages and hugetlb).
    var reportHugePages = false
    /// Read the handler's stats before stopping it (the handlers of forked children are
    /// forgotten by stop()).
    var statsWhileRunning = false

    /// Before registration: fill the memory or the page cache, madvise.
    var prepare: (MappedRegion) throws -> Void = { _ in }
    /// After the handler started, before the workload (e.g. write-protect the region).
    var armed: (SessionContext) throws -> Void = { _ in }
    /// Jobs that run beside the workers (e.g. a snapshot writer).
    var companions: (SessionContext) -> [@Sendable () -> Void] = { _ in [] }
    /// After the workload and the verification, while the handler still runs: the
    /// operation-specific checks, JSON details and summary lines.
    var finish: (SessionContext, inout SessionNotes) throws -> Void = { _, _ in }
    /// After the handler stopped (its threads joined): counters the resolving threads update
    /// after they woke the faulting threads (e.g. a ``WindowInstaller``'s) are final here.
    var stopped: (inout SessionNotes) -> Void = { _ in }

    /// A plan with the session's defaults: `size` bytes of `memory`, each page read (or written
    /// with --write), the memory's page size.
    init(_ operation: String, options: SessionOptions, memory: MemoryType, size: Int,
         handling: Handling, expected: ExpectedContent, expectedName: String? = nil) {
        self.operation = operation
        self.memory = memory
        self.size = size
        self.pageSize = memory.pageSize
        self.handling = handling
        self.actions = uniformActions(pages: size / basePageSize, write: options.write)
        self.expected = expected
        self.expectedName = expectedName ?? expected.name
        self.write = options.write
    }
}

/// What the plan's hooks see of a running session.
struct SessionContext {
    let region: MappedRegion
    /// nil for ``SessionPlan/Handling/kernel``.
    let uffd: Userfaultfd?
    /// nil before the handler started and for ``SessionPlan/Handling/kernel``.
    let handler: FaultHandler?
    /// Set once the workload ran.
    var seconds = 0.0
    var verification = Verification()
    /// The in-thread resolver's counters (``SessionPlan/Handling/inThread``), set once the workload ran.
    var inThread: InThreadResolver.Stats?
}

/// The operation-specific part of a report.
struct SessionNotes {
    /// A condition that must hold for success.
    struct Check {
        /// Its key under `checks` in the JSON.
        var key: String
        /// What it says, in the summary.
        var text: String
        var ok: Bool
    }
    /// JSON fields beside the common ones.
    var details: [String: JSONValue] = [:]
    /// Summary lines after the common ones.
    var lines: [String] = []
    var checks: [Check] = []
    /// Bytes resolved outside the handler's resolutions (e.g. windows a ``WindowInstaller``
    /// installed and woke itself), added to the report's `resolved_bytes`.
    var resolvedBytes: UInt64 = 0
}

/// Runs a ``SessionPlan`` with the CLI's options and error mapping.
enum SessionRunner {
    static func run(_ plan: SessionPlan, options: SessionOptions) throws -> SessionReport {
        let region = try SessionSteps.map(plan.memory, length: plan.size, thpAligned: plan.thpAligned)
        try plan.prepare(region)
        var uffd: Userfaultfd?
        var handler: FaultHandler?
        if case .handler(let features, let modes, let needed, let makePolicy) = plan.handling {
            let fd = try SessionSteps.open(features: features)
            try SessionSteps.register(fd, region, modes: modes, needed: needed, memory: plan.memory)
            let policy = try makePolicy(SessionContext(region: region, uffd: fd, handler: nil))
            handler = try SessionSteps.startHandler(fd, policy: policy, readers: options.readers, pin: options.pin)
            uffd = fd
        }
        defer { handler?.stop() }
        var inThread: InThreadSession?
        if case .inThread(let features, let modes, let needed, let unit, let makePolicy) = plan.handling {
            inThread = try InThreadSession(region: region, memory: plan.memory, features: features, modes: modes,
                                           needed: needed, unit: unit, policy: makePolicy)
            uffd = inThread?.uffd
        }
        defer { inThread?.end() }
        var context = SessionContext(region: region, uffd: uffd, handler: handler)
        try plan.armed(context)

        let workload = Workload(base: region.address, length: plan.size, threads: options.threads,
                                order: options.access, actions: plan.actions,
                                companions: plan.companions(context), pin: options.pin)
        context.seconds = try workload.run(timeout: options.timeout,
                                           progress: ProgressBar(quiet: options.quiet, total: workload.pages,
                                                                 label: plan.operation)).seconds
        context.verification = try verifyRegion(base: region.address, length: plan.size,
                                                expected: plan.expected, actions: plan.actions)
        context.inThread = inThread?.end()
        var notes = SessionNotes()
        try plan.finish(context, &notes)
        if plan.reportHugePages { SessionSteps.reportHugePages(region, length: plan.size, into: &notes) }
        var stats = plan.statsWhileRunning ? handler?.stats() : nil
        handler?.stop()
        if !plan.statsWhileRunning { stats = handler?.stats() }
        plan.stopped(&notes)
        if let s = context.inThread { stats = InThreadSession.report(s, minor: plan.handling.minor, into: &notes) }

        var report = SessionReport(
            summary: SessionSummary(
                operation: plan.operation, memory: plan.memory, size: plan.size, pageSize: plan.pageSize,
                threads: options.threads, access: options.access, write: plan.write,
                readers: handler == nil ? 0 : options.readers, pin: options.pin, seconds: context.seconds,
                stats: stats, verification: context.verification, expected: plan.expectedName,
                firstFailure: handler?.failures().first?.description
                    ?? context.inThread?.firstError.map { "first failed in-thread resolution: \($0)" },
                checks: notes.checks, latency: context.inThread.map(InThreadSession.latency)),
            details: notes.details, notes: notes)
        report.summary.resolvedBytes += notes.resolvedBytes
        return report
    }
}

extension SessionSteps {
    /// Huge-page coverage of the region now: JSON `huge_page_bytes` and a summary line (an
    /// unreadable page map leaves both out and says why).
    static func reportHugePages(_ region: MappedRegion, length: Int, into notes: inout SessionNotes) {
        do throws(UffdError) {
            let huge = try WindowInstaller.hugePageBytes(start: region.address, length: length)
            notes.details["huge_page_bytes"] = .int(huge)
            let percent = length > 0 ? huge * 100 / length : 0
            notes.lines.append("huge pages   \(formatBytes(huge)) of \(formatBytes(length)) backed by huge pages (\(percent)%)")
        } catch {
            notes.lines.append("huge pages   unknown (\(error))")
        }
    }
}
