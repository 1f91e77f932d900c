import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl continue`: minor faults on shmem/hugetlb resolved with UFFDIO_CONTINUE.
struct ContinueCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "continue",
        abstract: "Minor faults on shmem, shmem-private or hugetlb resolved with UFFDIO_CONTINUE.",
        discussion: """
            Fills the page cache through a second shared view of the memfd (the pattern), \
            registers the first view for minor faults, and maps each faulting page with \
            UFFDIO_CONTINUE; every byte is then compared with the pattern. With \
            --memory shmem-private the registered view is a private mapping of the memfd: \
            CONTINUE maps the page cache into it and writes copy the page, so the second \
            view keeps the pattern. \
            Default session: 64 MiB shmem, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    func run() throws {
        let memory = session.memoryChoice ?? .shmem
        try session.validateCommon()
        guard memory != .anon else {
            throw CLIError.usage("continue needs --memory shmem or hugetlb (or shmem-private): minor faults need a page cache, not \(memory.rawValue)")
        }
        // A private view's writes land in private copies of the pages, not in the page cache.
        let privateView = memory == .shmemPrivate
        let pageSize = memory.pageSize
        let size = try session.regionSize(pageSize: pageSize, memory: memory)
        try session.checkHugePages(size, memory: memory)

        let region = try SessionSteps.map(memory, length: size)
        guard let alias = region.alias else { throw CLIError.failed("the \(memory.rawValue) region has no second view") }
        // Fill the page cache through the alias: the registered view then takes minor faults.
        fillPattern(alias, offset: 0, count: size)

        let uffd = try SessionSteps.open(features: SessionSteps.memoryFeatures(memory, minor: true))
        try SessionSteps.register(uffd, region, modes: .minor, needed: .continue, memory: memory)
        let policy: ContinuePolicy
        do {
            policy = try ContinuePolicy(region: region)
        } catch {
            throw cliError(error, what: "creating the continue policy")
        }
        let handler = try SessionSteps.startHandler(uffd, policy: policy, readers: session.readers, pin: session.pin)
        defer { handler.stop() }

        let actions = uniformActions(pages: size / basePageSize, write: session.write)
        let workload = Workload(base: region.address, length: size, threads: session.threads,
                                order: session.access, actions: actions, pin: session.pin)
        let outcome = try workload.run(timeout: session.timeout,
                                       progress: ProgressBar(quiet: session.quiet, total: workload.pages, label: "continue"))
        let verification = try verifyRegion(base: region.address, length: size, expected: .pattern(seed: 0x5EED), actions: actions)
        // Writes through a shared registered view land in the same page cache: the alias must
        // agree. Through a private view they do not: the alias must still hold the pattern.
        let aliasActions = privateView ? actions.map { $0 == .write ? .read : $0 } : actions
        let aliasVerification = try verifyRegion(base: UInt(bitPattern: alias), length: size,
                                                 expected: .pattern(seed: 0x5EED), actions: aliasActions)
        handler.stop()

        var report = SessionReport(operation: "continue", memory: memory, size: size, pageSize: pageSize,
                                   threads: session.threads, access: session.access, write: session.write,
                                   readers: session.readers, pin: session.pin, seconds: outcome.seconds, stats: handler.stats(),
                                   verification: verification, expectedName: "the page cache filled through the second view")
        report.firstFailure = handler.failures().first?.description
        report.checks.append(privateView
            ? ("second_view_agrees", "the second view still holds the page cache (private writes stay private)", aliasVerification.ok)
            : ("second_view_agrees", "the second view holds the same bytes", aliasVerification.ok))
        report.extra["page_cache_filled_through"] = "second shared view (memfd alias)"
        report.lines.append("page cache   filled through the second view before the run; second view \(aliasVerification.ok ? "agrees" : "DIFFERS") after it")
        try report.emit(json: session.json)
    }
}
