import Foundation
import UffdKit

/// `--in-thread`: the session's faults are resolved by the faulting threads themselves
/// (UFFD_FEATURE_SIGBUS and ``InThreadResolver``), with no handler thread.
enum InThreadSession {
    /// The resolver's counters in the shape of the report's handler stats (every SIGBUS the
    /// workers took counts as a fault of `kind`; there is no per-resolution latency).
    static func handlerStats(_ s: InThreadResolver.Stats, minor: Bool) -> HandlerStats {
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
        return h
    }

    /// Runs the workload over `region` with `policy` resolved in-thread (`unit` bytes per fault:
    /// the region's page by default), verifies every byte against `expected` and reports it as
    /// `operation`.
    static func run(operation: String, session: SessionOptions, memory: MemoryType? = nil, region: MappedRegion,
                    unit: Int? = nil, features: Features,
                    modes: RegisterMode = .missing, needed: Ioctls, policy: InThreadResolver.Policy,
                    expected: ExpectedContent, extra: [String: Any] = [:], lines: [String] = []) throws(CLIError) {
        let memory = memory ?? session.memory
        let uffd = try SessionSteps.open(features: features.union(.sigbus))
        let resolver: InThreadResolver
        do {
            resolver = try InThreadResolver(uffd: uffd)
        } catch {
            throw cliError(error, what: "in-thread resolver")
        }
        // A fault the policy cannot resolve maps zeros: the worker goes on, verification fails
        // and the session exits 1 (as the handler sessions do), instead of dying of SIGBUS.
        let range: InThreadResolver.Range
        do {
            try SessionSteps.register(uffd, region, modes: modes, needed: needed, memory: memory)
            range = try resolver.add(region.address, length: region.length, policy: policy, fallback: .zeroFill,
                                     pageSize: unit ?? region.pageSize, register: false)
            try resolver.install()
        } catch let e as CLIError {
            throw e
        } catch let e as UffdError {
            throw cliError(e, memory: memory, what: "in-thread resolver")
        } catch {
            throw .failed("in-thread resolver: \(error)")
        }

        let actions = uniformActions(pages: region.length / basePageSize, write: session.write)
        let workload = Workload(base: region.address, length: region.length, threads: session.threads,
                                order: session.access, actions: actions, pin: session.pin)
        let outcome = try workload.run(timeout: session.timeout,
                                       progress: ProgressBar(quiet: session.quiet, total: workload.pages, label: operation))
        let s = resolver.stats(range)
        // Every worker is done: the previous SIGBUS action can be put back safely.
        try? uffd.unregister(region.address, length: region.length)
        resolver.uninstall(restoringPreviousHandler: true)
        let verification = try verifyRegion(base: region.address, length: region.length, expected: expected, actions: actions)

        var report = SessionReport(operation: operation, memory: memory, size: region.length, pageSize: unit ?? region.pageSize,
                                   threads: session.threads, access: session.access, write: session.write,
                                   readers: 0, pin: session.pin, seconds: outcome.seconds,
                                   stats: handlerStats(s, minor: modes.contains(.minor)),
                                   verification: verification, expectedName: expected.name)
        report.firstFailure = s.firstError.map { "first failed resolution: \($0)" }
        report.extra = extra
        report.extra["in_thread"] = true
        report.extra["signals"] = s.signals
        report.lines = lines
        report.lines.append("in-thread    \(s.signals) SIGBUS resolved in the faulting threads "
            + "(\(s.resolved) by the policy, \(s.existed) already there, \(s.fallbacks) zero-filled after a failure); no handler thread")
        try report.emit(json: session.json)
    }
}

extension CopyCommand {
    /// `copy --in-thread`: the pattern is copied from memory laid out like the region, a file
    /// is pread page by page (zeros past its end), zeros are mapped with ZEROPAGE.
    func runInThread(_ parsed: CopySource, size: Int, fileFD: Int32, fileLength: Int,
                     window: ReadaheadPolicy<CopyPolicy>.Window?) throws(CLIError) {
        guard window == nil, failPages == nil else {
            throw .usage("--in-thread resolves one page per fault: --readahead and --fail-pages do not apply")
        }
        let memory = session.memory
        let region = try SessionSteps.map(memory, length: size)
        var sourceRegion: MappedRegion?
        let policy: InThreadResolver.Policy
        let expected: ExpectedContent
        switch parsed {
        case .zero:
            policy = .zero
            expected = .zero
        case .pattern:
            expected = .pattern(seed: 0x5EED)
            let src = try SessionSteps.map(.anon, length: size)
            try expected.fill(src.pointer, offset: 0, count: size)
            sourceRegion = src
            policy = .copy(from: src.address)
        case .file:
            policy = .fileDescriptor(fileFD, offset: 0)
            expected = .file(fd: fileFD, length: fileLength)
        }
        var lines = ["source       \(source), readahead none"]
        if case .file = parsed {
            lines[0] += " (file \(fileLength) bytes, region \(size) bytes, tail \(size - fileLength) bytes zero)"
        }
        try withExtendedLifetime(sourceRegion) { () throws(CLIError) in
            try InThreadSession.run(operation: "copy", session: session, region: region,
                                    features: SessionSteps.memoryFeatures(memory),
                                    needed: parsed.isZero && memory != .hugetlb ? .zeropage : .copy, policy: policy,
                                    expected: expected, extra: ["source": source, "readahead": "none"], lines: lines)
        }
    }
}

extension CopySource {
    var isZero: Bool { if case .zero = self { true } else { false } }
}
