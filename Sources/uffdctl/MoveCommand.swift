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

        var moved: MovePolicy?
        var plan = SessionPlan("move", options: session, memory: .anon, size: size, handling: .handler(
            features: .move, modes: .missing, needed: .move,
            policy: { s in
                do throws(UffdError) {
                    moved = try MovePolicy(region: s.region, donor: donor, granule: granule)
                    return moved!
                } catch {
                    throw cliError(error, what: "creating the move policy")
                }
            }), expected: .pattern(seed: 0x5EED), expectedName: "the pattern moved from the donor")
        plan.pageSize = granule
        plan.thpAligned = huge
        plan.prepare = { region in if huge { try? region.advise(MADV_HUGEPAGE) } }
        plan.finish = { s, notes in
            let movedGranules = moved?.movedGranules ?? Int(s.inThread?.moves ?? 0)
            notes.details["granule"] = .int(granule)
            notes.details["moved_granules"] = .int(movedGranules)
            notes.lines.append("donor        \(movedGranules) of \(size / granule) granules of \(formatBytes(granule)) moved")
            guard compareCopy else { return }
            let copy = try SessionRunner.run(Self.copyPlan(size: size, granule: granule, huge: huge, options: session), options: session)
            let ratio = s.seconds > 0 ? copy.seconds / s.seconds : 0
            notes.details["compare_copy"] = .object([
                "seconds": .double(copy.seconds),
                "gbps": .double(copy.gbps),
                "faults": .int(Int(copy.faults)),
                "verified": .bool(copy.verified),
                "copy_over_move": .double(ratio),
            ])
            notes.lines.append(String(format: "compare      COPY %.3f s (%.3f GB/s, %llu faults) vs MOVE %.3f s: MOVE is %.2fx the speed of COPY",
                                      copy.seconds, copy.gbps, copy.faults, s.seconds, ratio))
            notes.checks.append(.init(key: "copy_verified", text: "the COPY comparison run verified", ok: copy.verified))
        }
        if inThread {
            guard !compareCopy else { throw CLIError.usage("--in-thread cannot be combined with --compare-copy") }
            plan.handling = .inThread(features: .move, modes: .missing, needed: .move, unit: granule,
                                      policy: { _ in .move(donor: donor) })
        }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }

    /// The same workload filled with UFFDIO_COPY of `granule`-sized pieces from a populated buffer.
    private static func copyPlan(size: Int, granule: Int, huge: Bool, options: SessionOptions) -> SessionPlan {
        let image = MemorySource(length: size) { fillPattern($0.baseAddress!, offset: 0, count: size) }
        var plan = SessionPlan("copy", options: options, memory: .anon, size: size, handling: .handler(
            features: [], modes: .missing, needed: .copy,
            policy: { CopyPolicy(start: $0.region.address, length: size, source: image, pageSize: granule) }),
            expected: .pattern(seed: 0x5EED))
        plan.pageSize = granule
        plan.thpAligned = huge
        plan.prepare = { region in if huge { try? region.advise(MADV_HUGEPAGE) } }
        return plan
    }
}
