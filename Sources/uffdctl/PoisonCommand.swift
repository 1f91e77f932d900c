import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl poison`: chosen pages are poisoned (UFFDIO_POISON); touching one raises SIGBUS
/// (shown in forked children) while every other page works.
struct PoisonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "poison",
        abstract: "Poison chosen pages (UFFDIO_POISON): touching one raises SIGBUS in a child, the others work.",
        discussion: """
            Registers the region for missing faults with a policy that poisons the chosen pages \
            and copies the pattern into every other page. The workers touch every other page \
            (verified byte for byte). Then, for each poisoned page, a forked child (its memory \
            served by the same policy through EVENT_FORK) reads a good page, checks it, and \
            touches the poisoned one: it must die of SIGBUS. \
            Default session: 64 MiB anon, 2 threads, pages 1, the middle one and the last one.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    @Option(name: .customLong("pages"), help: ArgumentHelp("Page indexes to poison, comma-separated (default: 1, middle, last).",
                                                           valueName: "list"))
    var pageList: String?

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        let pageSize = memory.pageSize
        let size = try session.regionSize(pageSize: pageSize)
        try session.checkHugePages(size)
        let count = size / pageSize
        let chosen = try poisonedPages(count: count)
        guard chosen.count < count else { throw CLIError.usage("--pages poisons every page: leave at least one page to work") }

        let perPage = pageSize / basePageSize
        let poisonedSet = Set(chosen)
        var plan = SessionPlan("poison", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory).union([.poison, .eventFork]), modes: .missing,
            needed: [.poison, .copy],
            policy: { s in
                PoisonPolicy(pages: chosen.map { s.region.address + UInt($0 * pageSize) }, pageSize: pageSize,
                             otherwise: CopyPolicy(region: s.region, source: PatternSource(length: size)))
            }), expected: .pattern(seed: 0x5EED))
        plan.actions = (0..<size / basePageSize).map { poisonedSet.contains($0 / perPage) ? .skip : (session.write ? .write : .read) }
        // FaultHandler.stop() forgets the stats of the handlers it ran for forked children, so
        // read them while they run (every child has exited; their resolutions are published).
        plan.statsWhileRunning = true
        plan.finish = { s, notes in
            // A good page for the children to read first (the first page not poisoned).
            let good = (0..<count).first { !poisonedSet.contains($0) }!
            let goodWord = session.write ? Workload.marker(good * perPage) : PatternSource.word(at: good * pageSize, seed: 0x5EED)
            var sigbus = 0
            var children: [JSONValue] = []
            for page in chosen {
                let result = try touchInChild(good: s.region.address + UInt(good * pageSize), goodWord: goodWord,
                                              poisoned: s.region.address + UInt(page * pageSize))
                if result == "SIGBUS" { sigbus += 1 }
                children.append(.object(["page": .int(page), "child": .string(result)]))
                notes.lines.append("child        touched page \(page): \(result)")
            }
            // A child dies as soon as its POISON ioctl returns, before its handler publishes the
            // batch's counters: give the handlers a moment so the report counts every child.
            let published = Date().addingTimeInterval(5)
            while (s.handler!.stats().resolutions[.poison] ?? 0) < UInt64(sigbus) && Date() < published { usleep(1000) }
            notes.lines.insert("poisoned     pages \(chosen.map(String.init).joined(separator: ", ")) of \(count)", at: 0)
            notes.details["poisoned_pages"] = .array(chosen.map { .int($0) })
            notes.details["children"] = .array(children)
            notes.details["sigbus_children"] = .int(sigbus)
            notes.checks.append(.init(key: "sigbus_in_children", text: "every poisoned page raised SIGBUS in its child",
                                      ok: sigbus == chosen.count))
        }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }

    private func poisonedPages(count: Int) throws(CLIError) -> [Int] {
        guard let pageList else { return Array(Set([min(1, count - 1), count / 2, count - 1])).sorted() }
        var out: [Int] = []
        for part in pageList.split(separator: ",", omittingEmptySubsequences: false) {
            let t = part.trimmingCharacters(in: .whitespaces)
            guard let n = Int(t), n >= 0 else { throw .usage("--pages '\(pageList)': '\(t)' is not a page index") }
            guard n < count else { throw .usage("--pages: page \(n) is outside the region (\(count) pages)") }
            out.append(n)
        }
        guard !out.isEmpty else { throw .usage("--pages needs at least one page index") }
        return Array(Set(out)).sorted()
    }

    /// Forks a child that reads the good page (exit 3 when it holds the wrong word), then the
    /// poisoned one (exit 0 if it survives). Returns "SIGBUS" when it died of SIGBUS.
    private func touchInChild(good: UInt, goodWord: UInt64, poisoned: UInt) throws(CLIError) -> String {
        let pid = fork()
        if pid < 0 { throw CLIError.failed("fork failed: \(errnoName(errno))") }
        if pid == 0 {
            // Only async-signal-safe work here: default SIGBUS (no backtracer), no core file.
            signal(SIGBUS, SIG_DFL)
            var noCore = rlimit(rlim_cur: 0, rlim_max: 0)
            _ = setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &noCore)
            let g = UnsafePointer<UInt64>(bitPattern: good)!.pointee
            if g != goodWord { _exit(3) }
            let p = UnsafePointer<UInt64>(bitPattern: poisoned)!.pointee
            _exit(p == 0x5EED ? 4 : 0)
        }
        var status: Int32 = 0
        let deadline = Date().addingTimeInterval(min(session.timeout, 30))
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { break }
            if r < 0 && errno != EINTR { throw CLIError.failed("waitpid: \(errnoName(errno))") }
            if Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                return "hung (killed by the watchdog)"
            }
            usleep(2000)
        }
        let signalled = status & 0x7f
        if signalled != 0 && signalled != 0x7f {
            return signalled == SIGBUS ? "SIGBUS" : "killed by signal \(signalled)"
        }
        let code = (status >> 8) & 0xff
        return code == 3 ? "good page held the wrong data" : "survived (exit \(code))"
    }
}
