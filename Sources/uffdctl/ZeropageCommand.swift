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

    @Flag(name: .customLong("in-thread"),
          help: "Resolve each fault in the faulting thread (UFFD_FEATURE_SIGBUS), with no handler thread.")
    var inThread = false

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        let size = try session.regionSize(pageSize: memory.pageSize)
        try session.checkHugePages(size)

        // hugetlb has no UFFDIO_ZEROPAGE: the policy copies zeros there.
        let copiesZeros = memory.isHugetlb
        var plan = SessionPlan("zeropage", options: session, memory: memory, size: size, handling: .handler(
            features: SessionSteps.memoryFeatures(memory), modes: .missing, needed: copiesZeros ? .copy : .zeropage,
            policy: { ZeroFillPolicy(region: $0.region) }), expected: .zero)
        plan.finish = { _, notes in
            notes.details["zero_fill"] = copiesZeros ? "copy" : "zeropage"
            if copiesZeros {
                notes.lines.append("zero-fill    hugetlb has no UFFDIO_ZEROPAGE: zeros are copied (UFFDIO_COPY from a shared zero huge page)")
            }
        }
        if inThread {
            plan.handling = .inThread(features: SessionSteps.memoryFeatures(memory), modes: .missing,
                                      needed: copiesZeros ? .copy : .zeropage, unit: nil, policy: { _ in .zero })
        }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }
}
