import Foundation
import UffdKit

/// `--in-thread`: a session's faults are resolved by the faulting threads themselves
/// (UFFD_FEATURE_SIGBUS and ``InThreadResolver``), with no handler thread. ``SessionRunner`` arms
/// one for ``SessionPlan/Handling/inThread`` before the workload and ends it after.
final class InThreadSession {
    let uffd: Userfaultfd
    private let resolver: InThreadResolver
    private let range: InThreadResolver.Range
    private let region: MappedRegion
    private var ended = false

    /// Opens a SIGBUS-mode fd with `features`, registers the region for `modes` (the range must
    /// offer `needed`), adds it with the plan's policy and installs the handler. A fault the
    /// policy cannot resolve maps zeros: the worker goes on, the session reports the failure and
    /// exits 1 (as the handler sessions do), instead of dying of SIGBUS.
    init(region: MappedRegion, memory: MemoryType, features: Features, modes: RegisterMode, needed: Ioctls,
         unit: Int?, policy makePolicy: (SessionContext) throws -> InThreadResolver.Policy) throws {
        uffd = try SessionSteps.open(features: features.union(.sigbus))
        self.region = region
        do {
            resolver = try InThreadResolver(uffd: uffd)
        } catch {
            throw cliError(error, what: "in-thread resolver")
        }
        try SessionSteps.register(uffd, region, modes: modes, needed: needed, memory: memory)
        let policy = try makePolicy(SessionContext(region: region, uffd: uffd, handler: nil))
        do {
            range = try resolver.add(region.address, length: region.length, policy: policy, fallback: .zeroFill,
                                     pageSize: unit ?? region.pageSize, register: false, recordLatency: true)
            try resolver.install()
        } catch {
            throw cliError(error, memory: memory, what: "in-thread resolver")
        }
    }

    /// The counters, once: unregisters the region and puts the previous SIGBUS action back (the
    /// workers are done by then). Later calls do nothing and return nil.
    @discardableResult
    func end() -> InThreadResolver.Stats? {
        guard !ended else { return nil }
        ended = true
        let s = resolver.stats(range)
        try? uffd.unregister(region.address, length: region.length)
        resolver.uninstall(restoringPreviousHandler: true)
        return s
    }

    /// The resolver's counters in the shape of the report's handler stats (every SIGBUS the
    /// workers took counts as a fault; the latency is ``latency(_:)``'s, not in these), plus the
    /// summary line and JSON fields of the in-thread mode.
    static func report(_ s: InThreadResolver.Stats, minor: Bool, into notes: inout SessionNotes) -> HandlerStats {
        var h = HandlerStats()
        if minor { h.minorFaults = s.signals } else { h.missingFaults = s.signals }
        let ops: [(Resolution.Operation, UInt64)] = [
            (.copy, s.copies), (.zeropage, s.zeropages), (.move, s.moves), (.continue, s.continues), (.poison, s.poisons),
        ]
        for (op, n) in ops where n > 0 { h.resolutions[op] = n }
        h.bytes = s.bytes
        h.existed = s.existed
        h.gone = s.gone
        h.retries = s.retries
        h.fallbacks = s.fallbacks
        h.failures = s.delivered + s.loopBreaks
        notes.details["in_thread"] = .bool(true)
        notes.details["signals"] = .int(Int(s.signals))
        notes.lines.append("in-thread    \(s.signals) SIGBUS resolved in the faulting threads "
            + "(\(s.resolved) by the policy, \(s.existed) already there, \(s.fallbacks) zero-filled after a failure); no handler thread")
        return h
    }
}

extension InThreadSession {
    /// The report's `fault_latency_us` from the resolver's buckets: the same fields as a handler
    /// session's, each percentile a bucket upper bound (12.5% precision), max exact.
    static func latency(_ s: InThreadResolver.Stats) -> SessionSummary.Latency {
        let l = s.latency
        return .init(p50: Double(l.p50) / 1000, p99: Double(l.p99) / 1000, max: Double(l.maxNs) / 1000, samples: l.count)
    }
}

extension SessionPlan.Handling {
    /// Whether the faults are minor faults (the report counts them as such).
    var minor: Bool {
        switch self {
        case .handler(_, let modes, _, _), .inThread(_, let modes, _, _, _): modes.contains(.minor)
        case .kernel: false
        }
    }
}

extension CopyCommand {
    /// `copy --in-thread`: the pattern is copied from memory laid out like the region, a file
    /// is pread page by page (zeros past its end), zeros are mapped with ZEROPAGE.
    func inThreadHandling(_ parsed: CopySource, size: Int, fileFD: Int32,
                          window: ReadaheadPolicy<CopyPolicy>.Window?) throws(CLIError) -> SessionPlan.Handling {
        guard window == nil, failPages == nil else {
            throw .usage("--in-thread resolves one page per fault: --readahead and --fail-pages do not apply")
        }
        let memory = session.memory
        let policy: InThreadResolver.Policy
        switch parsed {
        case .zero:
            policy = .zero
        case .pattern:
            // Kept alive by the plan's closure for the whole session.
            let source = try SessionSteps.map(.anon, length: size)
            try ExpectedContent.pattern(seed: 0x5EED).fill(source.pointer, offset: 0, count: size)
            return .inThread(features: SessionSteps.memoryFeatures(memory), modes: .missing, needed: .copy, unit: nil,
                             policy: { _ in .copy(from: source.address) })
        case .file:
            policy = .fileDescriptor(fileFD, offset: 0)
        case .named(let spec):
            throw .usage("--in-thread reads local raw files only: --source \(spec) is remote or packed (drop --in-thread)")
        }
        let zeroNeeds: Ioctls = memory.isHugetlb ? .copy : .zeropage
        return .inThread(features: SessionSteps.memoryFeatures(memory), modes: .missing,
                         needed: policy.isZero ? zeroNeeds : .copy, unit: nil, policy: { _ in policy })
    }
}

extension InThreadResolver.Policy {
    var isZero: Bool { if case .zero = self { true } else { false } }
}
