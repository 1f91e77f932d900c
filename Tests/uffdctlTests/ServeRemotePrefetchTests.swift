import Foundation
import TestServers
import XCTest

/// `uffdctl serve --memory-file http://… --record-working-set / --prefetch` with real hand-offs
/// (every page verified by the client): the recording is prefetched from nginx through the
/// handler's deferred table (the regions are chunk-aligned: the deferred path).
final class ServeRemotePrefetchTests: ServeWorkingSetTestCase {
    override var dirPrefix: String { "serve-rpf" }

    override func setUpWithError() throws {
        try super.setUpWithError()
        try makeImage(chunks: 8, tail: 0).write(to: URL(fileURLWithPath: memFile))   // 16 MiB
    }

    func testServeFromURLRecordsThenPrefetches() throws {
        let nginx = try Nginx()
        try nginx.put("mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        let url = nginx.url("mem")
        let ws = dir.appendingPathComponent("vm.ws").path
        let clientArgs = ["handoff-client", "--socket", sock, "--memory-file", memFile, "--size", "4M", "--offset", "4M",
                          "--regions", "2", "--timeout", "60"]
        let s1 = try serve(["--record-working-set", ws], memory: url)
        let c1 = try BackgroundUffdctl(clientArgs, dir: dir, name: "c1")
        XCTAssertEqual(c1.wait(), 0, c1.output + c1.log)
        XCTAssertEqual(s1.wait(timeout: 30), 0, s1.log)
        let info = try runUffdctl(["working-set", "info", ws, "--json"])
        XCTAssertEqual(info.code, 0, info.stderr)
        let planned = Int(number(info.json, "pages") ?? 0)
        // A deferred region faults once per 2 MiB chunk (the chunk comes whole): one page each.
        XCTAssertGreaterThan(planned, 0, info.stdout)

        let s2 = try serve(["--prefetch", ws], memory: url)
        let c2 = try BackgroundUffdctl(clientArgs, dir: dir, name: "c2")
        XCTAssertEqual(c2.wait(), 0, c2.output + c2.log)
        XCTAssertTrue(c2.output.contains("\"ok\":true"), c2.output)
        XCTAssertEqual(s2.wait(timeout: 30), 0, s2.log)
        let g = gone(s2)
        XCTAssertEqual(int(g, "prefetch_planned_pages"), planned, s2.log)
        // The client may be done and gone before the filler (then it was stopped, its claims
        // dropped: skipped). Every recorded page is accounted for either way.
        XCTAssertEqual((int(g, "prefetched_pages") ?? 0) + (int(g, "prefetch_already_present_pages") ?? 0)
                       + (int(g, "prefetch_skipped_pages") ?? 0), planned, s2.log)
        let ending = g?["prefetch_ending"] as? String
        XCTAssertTrue(ending == "finished" || ending == "stopped" || ending == "process-gone", s2.log)
        if ending == "finished" { XCTAssertEqual(int(g, "prefetch_skipped_pages"), 0, s2.log) }
        XCTAssertEqual(int(g, "fallbacks"), 0, s2.log)
        // The stats and the deferred path's are in the per-VM line.
        let prefetched = int(g, "prefetched_pages") ?? -1
        XCTAssertEqual(int(g, "prefetched_bytes"), prefetched * 4096, s2.log)
        let installed = int(g, "prefetch_installed_pages") ?? -1
        XCTAssertEqual(installed, prefetched + (int(g, "prefetch_extra_pages") ?? -1), s2.log)
        XCTAssertLessThanOrEqual(int(g, "prefetch_faults_avoided") ?? .max, installed, s2.log)
        // A server cannot see a guest's reads of present pages: unknown, said so.
        XCTAssertEqual(g?["prefetched_and_used_pages"] as? String, "-", s2.log)
        XCTAssertEqual(g?["prefetch_wasted_bytes"] as? String, "-", s2.log)
        XCTAssertNotNil(g?["prefetch_last_page_ms"], s2.log)
        XCTAssertGreaterThanOrEqual(number(g, "prefetch_seconds") ?? -1, 0, s2.log)
        for k in ["prefetch_faults_joined", "prefetch_chunks_taken_by_faults", "prefetch_dropped_fetches", "prefetch_source_errors"] {
            XCTAssertGreaterThanOrEqual(int(g, k) ?? -1, 0, "\(k): \(s2.log)")
        }
        let chunks = int(g, "prefetch_deferred_chunks") ?? -1
        if prefetched > 0 { XCTAssertGreaterThan(chunks, 0, s2.log) }
        XCTAssertLessThanOrEqual(prefetched + (int(g, "prefetch_extra_pages") ?? 0), chunks * 512, s2.log)
    }
}
