import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl move`: missing faults resolved by moving pages in from a donor pool (UFFDIO_MOVE).
struct MoveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "move",
        abstract: "Zero-copy fills with UFFDIO_MOVE from a donor pool (4 KiB or --huge 2 MiB).",
        discussion: """
            Fills a MADV_DONTFORK donor region with the pattern, registers the (anonymous) \
            region for missing faults and moves each faulting page (or 2 MiB granule with \
            --huge) from the donor; every byte is then compared with the pattern. \
            --compare-copy runs the same workload with UFFDIO_COPY from a populated buffer in \
            the same run and prints the time ratio. Default session: 64 MiB anon, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    @Flag(help: "Move 2 MiB granules (THP donor, 2 MiB-aligned region); --size must be a multiple of 2 MiB.")
    var huge = false

    @Flag(name: .customLong("compare-copy"), help: "Also run the workload with UFFDIO_COPY and print the ratio.")
    var compareCopy = false

    @Flag(name: .customLong("in-thread"),
          help: "Resolve each fault in the faulting thread (UFFD_FEATURE_SIGBUS), with no handler thread.")
    var inThread = false

    func run() throws {
        try session.validateCommon()
        guard session.memory == .anon else {
            throw CLIError.usage("move works on anonymous memory only (UFFDIO_MOVE), not --memory \(session.memory.rawValue)")
        }
        let granule = huge ? 2 << 20 : basePageSize
        let size = try session.regionSize(pageSize: basePageSize, copies: compareCopy ? 4 : 2)
        if huge && size % granule != 0 {
            throw CLIError.usage("--size \(size) bytes is not a multiple of 2 MiB (needed by --huge)")
        }

        // The donor pool: populated by writing the pattern, as a producer would.
        let donor: MappedRegion
        do {
            donor = try MappedRegion.donor(length: size, alignment: huge ? granule : 0, hugePages: huge)
        } catch {
            throw cliError(error, memory: .anon, what: "mapping the donor pool")
        }
        fillPattern(donor.pointer, offset: 0, count: size)

        let region = try SessionSteps.map(.anon, length: size, thpAligned: huge)
        if huge { try? region.advise(MADV_HUGEPAGE) }
        if inThread {
            guard !compareCopy else { throw CLIError.usage("--in-thread cannot be combined with --compare-copy") }
            return try InThreadSession.run(operation: "move", session: session, region: region, unit: granule,
                                           features: .move, needed: .move, policy: .move(donor: donor),
                                           expected: .pattern(seed: 0x5EED))
        }
        let uffd = try SessionSteps.open(features: .move)
        try SessionSteps.register(uffd, region, modes: .missing, needed: .move, memory: .anon)
        let policy: MovePolicy
        do {
            policy = try MovePolicy(region: region, donor: donor, granule: granule)
        } catch {
            throw cliError(error, what: "creating the move policy")
        }
        let moveRun = try runFill(region: region, uffd: uffd, policy: policy, label: "move")

        var report = SessionReport(operation: "move", memory: .anon, size: size, pageSize: granule,
                                   threads: session.threads, access: session.access, write: session.write,
                                   readers: session.readers, pin: session.pin, seconds: moveRun.seconds, stats: moveRun.stats,
                                   verification: moveRun.verification, expectedName: "the pattern moved from the donor")
        report.firstFailure = moveRun.firstFailure
        report.extra["granule"] = granule
        report.extra["moved_granules"] = policy.movedGranules
        report.lines.append("donor        \(policy.movedGranules) of \(size / granule) granules of \(formatBytes(granule)) moved")

        if compareCopy {
            let copyRegion = try SessionSteps.map(.anon, length: size, thpAligned: huge)
            if huge { try? copyRegion.advise(MADV_HUGEPAGE) }
            let copyFD = try SessionSteps.open(features: [])
            try SessionSteps.register(copyFD, copyRegion, modes: .missing, needed: .copy, memory: .anon)
            let image = MemorySource(length: size) { fillPattern($0.baseAddress!, offset: 0, count: size) }
            let copyPolicy = CopyPolicy(start: copyRegion.address, length: size, source: image, pageSize: granule)
            let copyRun = try runFill(region: copyRegion, uffd: copyFD, policy: copyPolicy, label: "copy")
            let ratio = moveRun.seconds > 0 ? copyRun.seconds / moveRun.seconds : 0
            report.extra["compare_copy"] = [
                "seconds": copyRun.seconds,
                "gbps": copyRun.seconds > 0 ? Double(size) / copyRun.seconds / 1e9 : 0,
                "faults": copyRun.stats.faults,
                "verified": copyRun.verification.ok,
                "copy_over_move": ratio,
            ] as [String: Any]
            report.lines.append(String(format: "compare      COPY %.3f s (%.3f GB/s, %llu faults) vs MOVE %.3f s: MOVE is %.2fx the speed of COPY",
                                       copyRun.seconds, Double(size) / copyRun.seconds / 1e9, copyRun.stats.faults,
                                       moveRun.seconds, ratio))
            report.checks.append(("copy_verified", "the COPY comparison run verified", copyRun.verification.ok))
        }
        try report.emit(json: session.json)
    }

    struct FillRun {
        var seconds: Double
        var stats: HandlerStats
        var verification: Verification
        var firstFailure: String?
    }

    /// Starts a handler with `policy`, runs the workload, verifies against the pattern, stops.
    private func runFill(region: MappedRegion, uffd: Userfaultfd, policy: any FaultPolicy, label: String) throws -> FillRun {
        let handler = try SessionSteps.startHandler(uffd, policy: policy, readers: session.readers, pin: session.pin)
        defer { handler.stop() }
        let actions = uniformActions(pages: region.length / basePageSize, write: session.write)
        let workload = Workload(base: region.address, length: region.length, threads: session.threads,
                                order: session.access, actions: actions, pin: session.pin)
        let outcome = try workload.run(timeout: session.timeout,
                                       progress: ProgressBar(quiet: session.quiet, total: workload.pages, label: label))
        let v = try verifyRegion(base: region.address, length: region.length, expected: .pattern(seed: 0x5EED), actions: actions)
        handler.stop()
        return FillRun(seconds: outcome.seconds, stats: handler.stats(), verification: v,
                       firstFailure: handler.failures().first?.description)
    }
}
