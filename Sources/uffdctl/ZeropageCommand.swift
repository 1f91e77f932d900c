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
            fault (anon, shmem; hugetlb has no ZEROPAGE and exits 3). Reads stay on the zero \
            page; with --write each page is then copied on write by the kernel. \
            Default session: 64 MiB anon, 2 threads.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        let size = try session.regionSize(pageSize: memory.pageSize)
        try session.checkHugePages(size)

        let plan = SessionPlan("zeropage", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory), modes: .missing, needed: .zeropage,
            policy: { ZeroFillPolicy(region: $0.region) }), expected: .zero)
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }
}
