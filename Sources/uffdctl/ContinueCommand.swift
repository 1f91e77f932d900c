import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl continue`: minor faults on shmem/hugetlb resolved with UFFDIO_CONTINUE.
struct ContinueCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "continue",
        abstract: "Minor faults on shmem, hugetlb or their private mappings resolved with UFFDIO_CONTINUE.",
        discussion: """
            Fills the page cache through a second shared view of the memfd (the pattern), \
            registers the first view for minor faults, and maps each faulting page with \
            UFFDIO_CONTINUE; every byte is then compared with the pattern. With \
            --memory shmem-private or hugetlb-private the registered view is a private mapping of the memfd: \
            CONTINUE maps the page cache into it and writes copy the page, so the second \
            view keeps the pattern. \
            Default session: 64 MiB shmem, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    @Flag(name: .customLong("in-thread"),
          help: "Resolve each fault in the faulting thread (UFFD_FEATURE_SIGBUS), with no handler thread.")
    var inThread = false

    func run() throws {
        let memory = session.memoryChoice ?? .shmem
        try session.validateCommon()
        guard memory != .anon else {
            throw CLIError.usage("continue needs --memory shmem or hugetlb (or shmem-private, hugetlb-private): minor faults need a page cache, not \(memory.rawValue)")
        }
        // A private view's writes land in private copies of the pages, not in the page cache.
        let privateView = memory.kind.isPrivateFile
        let size = try session.regionSize(pageSize: memory.pageSize, memory: memory)
        // hugetlb-private: the page cache, and a private copy of each page written.
        try session.checkHugePages(size, regions: privateView && session.write ? 2 : 1, memory: memory)

        var plan = SessionPlan("continue", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory, minor: true), modes: .minor, needed: .continue,
            policy: { s in
                do throws(UffdError) {
                    return try ContinuePolicy(region: s.region)
                } catch {
                    throw cliError(error, what: "creating the continue policy")
                }
            }), expected: .pattern(seed: 0x5EED),
            expectedName: "the page cache filled through the second view")
        // Fill the page cache through the alias: the registered view then takes minor faults.
        plan.prepare = { region in
            guard let alias = region.alias else { throw CLIError.failed("the \(memory.rawValue) region has no second view") }
            fillPattern(alias, offset: 0, count: size)
        }
        plan.finish = { [actions = plan.actions] s, notes in
            // Writes through a shared registered view land in the same page cache: the alias must
            // agree. Through a private view they do not: the alias must still hold the pattern.
            let aliasActions = privateView ? actions.map { $0 == .write ? .read : $0 } : actions
            let agrees = try verifyRegion(base: UInt(bitPattern: s.region.alias!), length: size,
                                          expected: .pattern(seed: 0x5EED), actions: aliasActions).ok
            notes.checks.append(privateView
                ? .init(key: "second_view_agrees", text: "the second view still holds the page cache (private writes stay private)", ok: agrees)
                : .init(key: "second_view_agrees", text: "the second view holds the same bytes", ok: agrees))
            notes.details["page_cache_filled_through"] = "second shared view (memfd alias)"
            notes.lines.append("page cache   filled through the second view before the run; second view \(agrees ? "agrees" : "DIFFERS") after it")
        }
        if inThread {
            plan.handling = .inThread(features: SessionSteps.memoryFeatures(memory, minor: true), modes: .minor,
                                      needed: .continue, unit: nil, policy: { _ in .continue })
        }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }
}
