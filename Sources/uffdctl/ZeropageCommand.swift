import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl zeropage`: missing faults resolved with UFFDIO_ZEROPAGE.
struct ZeropageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "zeropage",
        abstract: "Missing faults resolved with UFFDIO_ZEROPAGE; every byte must read zero.",
        discussion: """
            Registers the region for missing faults and maps the shared zero page on each \
            fault (anon, shmem). hugetlb has no UFFDIO_ZEROPAGE: there zeros are copied \
            (UFFDIO_COPY from a shared read-only huge page of zeros). Reads stay on the zero \
            page; with --write each page is then copied on write by the kernel. \
            Default session: 64 MiB anon, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        let pageSize = memory.pageSize
        let size = try session.regionSize(pageSize: pageSize)
        try session.checkHugePages(size)

        let region = try SessionSteps.map(memory, length: size)
        let uffd = try SessionSteps.open(features: SessionSteps.memoryFeatures(memory))
        // hugetlb has no UFFDIO_ZEROPAGE: the policy copies zeros there.
        let copiesZeros = memory == .hugetlb
        try SessionSteps.register(uffd, region, modes: .missing, needed: copiesZeros ? .copy : .zeropage, memory: memory)
        let handler = try SessionSteps.startHandler(uffd, policy: ZeroFillPolicy(region: region), readers: session.readers, pin: session.pin)
        defer { handler.stop() }

        let actions = uniformActions(pages: size / basePageSize, write: session.write)
        let workload = Workload(base: region.address, length: size, threads: session.threads,
                                order: session.access, actions: actions, pin: session.pin)
        let outcome = try workload.run(timeout: session.timeout,
                                       progress: ProgressBar(quiet: session.quiet, total: workload.pages, label: "zeropage"))
        let verification = try verifyRegion(base: region.address, length: size, expected: .zero, actions: actions)
        handler.stop()

        var report = SessionReport(operation: "zeropage", memory: memory, size: size, pageSize: pageSize,
                                   threads: session.threads, access: session.access, write: session.write,
                                   readers: session.readers, pin: session.pin, seconds: outcome.seconds, stats: handler.stats(),
                                   verification: verification, expectedName: "zeros")
        report.firstFailure = handler.failures().first?.description
        report.extra["zero_fill"] = copiesZeros ? "copy" : "zeropage"
        if copiesZeros {
            report.lines.append("zero-fill    hugetlb has no UFFDIO_ZEROPAGE: zeros are copied (UFFDIO_COPY from a shared zero huge page)")
        }
        try report.emit(json: session.json)
    }
}
