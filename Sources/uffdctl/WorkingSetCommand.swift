import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl working-set`: merge and inspect recorded working sets.
struct WorkingSetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "working-set",
        abstract: "Merge and inspect working sets recorded with --record-working-set.",
        discussion: """
            A working set is the order of first faults of one restore (page offset in the image \
            and time since the start), tied to the image it was recorded from (size and a \
            digest of sampled chunks). Record one with `uffdctl copy --record-working-set FILE`, \
            merge several runs with `working-set merge`, prefetch it with `--prefetch FILE`.

            Example:
              uffdctl copy --source file:/srv/vm.mem --access random --record-working-set run1.ws
              uffdctl copy --source file:/srv/vm.mem --access random --record-working-set run2.ws
              uffdctl working-set merge run1.ws run2.ws -o vm.ws
              uffdctl working-set info vm.ws
              uffdctl copy --source file:/srv/vm.mem --access random --prefetch vm.ws
            """ + exitCodesHelp,
        subcommands: [WorkingSetMerge.self, WorkingSetInfo.self]
    )
}

/// `uffdctl working-set merge A B ... -o OUT [--min K]`.
struct WorkingSetMerge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Keep the pages seen in every input (or in at least --min of them), ordered by average position.")

    @Argument(help: ArgumentHelp("Working-set files recorded from the same image.", valueName: "file"))
    var inputs: [String] = []

    @Option(name: [.short, .customLong("output")], help: ArgumentHelp("Where to write the merged working set.", valueName: "file"))
    var output: String

    @Option(name: .customLong("min"), help: ArgumentHelp("Keep pages seen in at least K inputs (default: all of them).", valueName: "K"))
    var minCount: Int?

    @Flag(help: "Print one JSON object on stdout instead of the human summary.")
    var json = false

    func run() throws {
        guard !inputs.isEmpty else { throw CLIError.usage("working-set merge needs at least one input file") }
        if let minCount, minCount < 1 || minCount > inputs.count {
            throw CLIError.usage("--min \(minCount): must be 1...\(inputs.count) (the number of inputs)")
        }
        let sets = try inputs.map { try loadWorkingSet($0) }
        let merged: WorkingSet
        do {
            merged = try WorkingSet.merged(sets, minCount: minCount)
        } catch {
            throw CLIError.usage("working-set merge: \(error.detail)")
        }
        do {
            try merged.write(to: output)
        } catch {
            throw CLIError.usage("cannot write \(output): \(error.errno)")
        }
        let kept = merged.entries.count
        let union = Set(sets.flatMap { $0.entries.map(\.offset) }).count
        if json {
            var o = workingSetJSON(merged, file: output)
            o["inputs"] = .int(inputs.count)
            o["min"] = .int(minCount ?? inputs.count)
            o["union_pages"] = .int(union)
            print(try jsonText(.object(o)))
        } else {
            print("merged       \(inputs.count) inputs -> \(output)")
            print("kept         \(kept) of \(union) pages (seen in at least \(minCount ?? inputs.count) of \(inputs.count) inputs), \(formatBytes(merged.bytes))")
            print(workingSetText(merged))
        }
    }
}

/// `uffdctl working-set info FILE`.
struct WorkingSetInfo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Summarise a working set: pages, bytes, coverage of the image, contiguous runs, duration.")

    @Argument(help: ArgumentHelp("A working-set file.", valueName: "file"))
    var file: String

    @Flag(help: "Print one JSON object on stdout instead of the human summary.")
    var json = false

    func run() throws {
        let ws = try loadWorkingSet(file)
        if json {
            print(try jsonText(.object(workingSetJSON(ws, file: file))))
        } else {
            print("file         \(file)")
            print(workingSetText(ws))
        }
    }
}

/// Reads a working set; exit 2 with the reason when it cannot be read or is invalid.
func loadWorkingSet(_ path: String) throws(CLIError) -> WorkingSet {
    do {
        return try WorkingSet(contentsOf: path)
    } catch {
        if error.operation == .source { throw .usage("cannot read working set \(path): \(error.errno)") }
        throw .usage(error.detail)
    }
}

/// The summary lines of a working set.
func workingSetText(_ ws: WorkingSet) -> String {
    let s = ws.summary
    return """
        image        \(formatBytes(ws.identity.size)) (\(ws.identity.size) bytes), digest \(String(ws.identity.digest, radix: 16))
        pages        \(s.pages) of \(formatBytes(ws.pageSize)), \(formatBytes(s.bytes)), \(String(format: "%.1f", s.coverage * 100))% of the image
        order        \(s.contiguousRuns) contiguous runs, offsets \(s.lowestOffset)...\(s.highestOffset)
        duration     last first fault at \(String(format: "%.3f", Double(s.lastNanoseconds) / 1e9)) s, \(ws.runs) run\(ws.runs == 1 ? "" : "s") merged
        """
}

/// The JSON fields of a working set.
func workingSetJSON(_ ws: WorkingSet, file: String) -> [String: JSONValue] {
    let s = ws.summary
    return [
        "file": .string(file), "format_version": .int(Int(WorkingSet.formatVersion)),
        "image_size": .int(ws.identity.size), "image_digest": .string(String(ws.identity.digest, radix: 16)),
        "page_size": .int(ws.pageSize), "pages": .int(s.pages), "bytes": .int(s.bytes),
        "coverage": .double(s.coverage), "contiguous_runs": .int(s.contiguousRuns),
        "last_fault_seconds": .double(Double(s.lastNanoseconds) / 1e9), "runs": .int(ws.runs),
    ]
}

func jsonText(_ v: JSONValue) throws -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys]
    return String(decoding: try e.encode(v), as: UTF8.self)
}

/// What `copy --record-working-set` / `--prefetch` add to a session.
final class WorkingSetSession: @unchecked Sendable {
    /// The recording's file, when recording.
    let recordPath: String?
    /// The working set to prefetch, checked against the image.
    let prefetch: WorkingSet?
    let prefetchPath: String?
    /// The image's identity, taken only when recording or prefetching (it reads samples of the
    /// source: for a remote source, requests).
    let identity: WorkingSet.Identity?
    let batchBytes: Int
    var tracker: WorkingSetTracker?
    var prefetcher: Prefetcher?

    /// Loads and checks the prefetch file against the image now: a stale recording is exit 2
    /// before anything is mapped.
    init(record: String?, prefetch: String?, batch: String?, source: any PageSource, size: Int, pageSize: Int) throws(CLIError) {
        if record != nil && prefetch != nil {
            throw .usage("--record-working-set and --prefetch cannot be combined: prefetched pages do not fault, so the recording would miss them (record on a run without --prefetch)")
        }
        recordPath = record
        prefetchPath = prefetch
        if record != nil || prefetch != nil {
            do {
                identity = try WorkingSet.Identity(of: source)
            } catch {
                throw .usage("cannot read the source to identify the image: \(error)")
            }
        } else {
            identity = nil
        }
        batchBytes = try batch.map { b throws(CLIError) in try parseSize(b, option: "--prefetch-batch") } ?? max(256 << 10, pageSize)
        guard batchBytes >= pageSize else { throw .usage("--prefetch-batch \(formatBytes(batchBytes)) is smaller than a page (\(formatBytes(pageSize)))") }
        if let prefetch, let identity {
            let ws = try loadWorkingSet(prefetch)
            do {
                try ws.check(against: identity, servedLength: size)
            } catch {
                throw .usage("--prefetch \(prefetch): \(error.detail)")
            }
            self.prefetch = ws
        } else {
            self.prefetch = nil
        }
    }

    var active: Bool { recordPath != nil || prefetch != nil }

    /// Wraps `policy` so faults are noted in a tracker of `range`.
    func wrap<P: FaultPolicy>(_ policy: P, range: ServedRange) throws(CLIError) -> any FaultPolicy {
        guard active else { return policy }
        do {
            let t = try WorkingSetTracker(range: range, recording: recordPath != nil)
            tracker = t
            return WorkingSetPolicy(policy, tracker: t)
        } catch {
            throw cliError(error, what: "working-set tracking")
        }
    }

    /// Starts the filler next to the handler (before the workload).
    func armed(_ s: SessionContext, range: ServedRange, source: any PageSource) throws(CLIError) {
        tracker?.restartClock()
        guard let prefetch, let uffd = s.uffd, let handler = s.handler else { return }
        var o = Prefetcher.Options()
        o.batchBytes = batchBytes
        do {
            let p = try Prefetcher(uffd: uffd, range: range, source: source, workingSet: prefetch, tracker: tracker, options: o)
            try p.start(alongside: handler)
            prefetcher = p
        } catch let e as UffdError {
            throw cliError(e, what: "starting the prefetch")
        } catch {
            throw CLIError.failed("starting the prefetch: \(error)")
        }
    }

    /// After the workload: writes the recording, or stops the filler and reports what it did.
    func finish(_ notes: inout SessionNotes, used: @escaping (Int) -> Bool) throws(CLIError) {
        if let recordPath, let tracker, let identity {
            let ws = tracker.workingSet(identity: identity)
            do {
                try ws.write(to: recordPath)
            } catch {
                throw .failed("--record-working-set: cannot write \(recordPath): \(error.errno)")
            }
            notes.details["working_set"] = .object(["file": .string(recordPath), "pages": .int(ws.entries.count), "bytes": .int(ws.bytes),
                                                    "last_fault_seconds": .double(Double(ws.summary.lastNanoseconds) / 1e9)])
            notes.lines.append("working set  \(ws.entries.count) pages (\(formatBytes(ws.bytes))) recorded to \(recordPath)")
        }
        if let prefetcher, let prefetchPath {
            // Every page the workload needed is present now; what is left of the list ends in EEXIST.
            if !prefetcher.wait(timeout: 10) { prefetcher.stop() }
            let s = prefetcher.stats(used: used)
            func opt(_ v: Int?) -> JSONValue { v.map { .int($0) } ?? .null }
            var o: [String: JSONValue] = [:]
            o["file"] = .string(prefetchPath)
            o["planned_pages"] = .int(s.plannedPages)
            o["prefetched_pages"] = .int(s.prefetchedPages)
            o["prefetched_bytes"] = .int(s.prefetchedBytes)
            o["already_present_pages"] = .int(s.alreadyPresentPages)
            o["skipped_pages"] = .int(s.skippedPages)
            o["faults_on_prefetched_pages"] = opt(s.faultsOnPrefetchedPages)
            o["faults_avoided"] = opt(s.faultsAvoided)
            o["prefetched_and_used_pages"] = opt(s.usedPages)
            o["wasted_bytes"] = opt(s.wastedBytes)
            o["batches"] = .int(s.batches)
            o["copies"] = .int(s.copies)
            o["wakes"] = .int(s.wakes)
            o["yielded_to_faults"] = .int(s.yieldedToFaults)
            o["retries"] = .int(s.retries)
            o["runs_skipped_ahead"] = .int(s.runsSkippedAhead)
            o["source_errors"] = .int(s.sourceErrors)
            o["deferred_chunks"] = .int(s.deferredChunks)
            o["faults_joined"] = .int(s.faultsJoined)
            o["chunks_taken_by_faults"] = .int(s.chunksTakenByFaults)
            o["dropped_fetches"] = .int(s.droppedFetches)
            o["extra_pages"] = .int(s.extraPages)
            // Every page the filler installed: used, wasted and faults avoided count over these.
            o["installed_pages"] = .int(s.prefetchedPages + s.extraPages)
            o["seconds"] = .double(s.seconds)
            o["time_to_last_page_seconds"] = s.timeToLastPage.map { JSONValue.double($0) } ?? .null
            o["ending"] = .string(s.ending?.description ?? "running")
            o["last_error"] = s.lastError.map { JSONValue.string($0) } ?? .null
            notes.details["prefetch"] = .object(o)
            let ending: String = s.timeToLastPage.map { String(format: "last page at %.3f s", $0) } ?? "ended: \(s.ending?.description ?? "running")"
            var line = "prefetch     \(s.prefetchedPages) of \(s.plannedPages) pages installed (\(formatBytes(s.prefetchedBytes))), "
            line += "\(s.alreadyPresentPages) already present, \(s.skippedPages) skipped; faults avoided \(s.faultsAvoided ?? 0), "
            line += "used \(s.usedPages.map(String.init) ?? "-"), late faults \(s.faultsOnPrefetchedPages ?? 0), "
            line += "wasted \(formatBytes(s.wastedBytes ?? 0)); " + ending
            notes.lines.append(line)
            if s.deferredChunks + s.chunksTakenByFaults + s.droppedFetches > 0 {
                notes.lines.append("prefetch     deferred: \(s.deferredChunks) chunks fetched, \(s.faultsJoined) faults joined them, "
                    + "\(s.chunksTakenByFaults) left to faults, \(s.droppedFetches) dropped, \(s.extraPages) extra pages with their chunk")
            }
            let why = s.lastError.map { ": " + $0 } ?? ""
            notes.checks.append(SessionNotes.Check(key: "prefetch_no_skips", text: "the prefetch skipped no page (\(s.skippedPages) skipped\(why))",
                                                   ok: s.skippedPages == 0))
        }
    }
}
