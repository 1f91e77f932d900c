import Foundation
import XCTest

/// End to end against a real Firecracker (v1.12.1, fetched by Tests/Firecracker/fetch-firecracker.sh
/// and cached outside the repo): the bare-metal guest in Tests/Firecracker/guest fills 128 MiB,
/// is snapshotted, and is restored in a new Firecracker whose guest memory `uffdctl serve` provides
/// through the Uffd backend. The restored guest reads its pages, checks both marker qwords of each
/// and prints the sum; Tests/Firecracker/fcrig.py drives it and checks the sum against its own.
/// Skipped, with the reason, without /dev/kvm, python3 or the Firecracker binary.
final class FirecrackerTests: XCTestCase {
    /// What one fcrig.py case reported.
    private struct Outcome {
        var json: [String: Any]
        var vms: [[String: Any]] { json["vms"] as? [[String: Any]] ?? [] }
        /// serve's own summaries ("VM gone" log lines) of the VMs it served.
        var served: [[String: Any]] { json["served"] as? [[String: Any]] ?? [] }
    }

    private struct RigFailure: Error, CustomStringConvertible {
        var description: String
    }

    private static let rig = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../Firecracker/fcrig.py").standardized

    /// Runs `fcrig.py e2e --case name`; a watchdog kills it (and fails the test) after `timeout`.
    /// Exit 77 is a skip with the rig's reason; any other failure throws with the rig's error.
    private func run(_ name: String, timeout: TimeInterval = 240, environment: [String: String] = [:]) throws -> Outcome {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/bin:/usr/local/bin"
        guard let python = path.split(separator: ":").map({ "\($0)/python3" })
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw XCTSkip("python3 not found: the Firecracker rig (Tests/Firecracker/fcrig.py) needs it")
        }
        let uffdctl = try uffdctlURL()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fcrig-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let outURL = dir.appendingPathComponent("stdout"), errURL = dir.appendingPathComponent("stderr")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        let out = try FileHandle(forWritingTo: outURL), err = try FileHandle(forWritingTo: errURL)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [Self.rig.path, "e2e", "--case", name, "--uffdctl", uffdctl.path]
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        try p.run()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        if p.isRunning {
            p.terminate()          // fcrig.py kills its Firecrackers and servers and gives huge pages back
            let grace = Date().addingTimeInterval(10)
            while p.isRunning && Date() < grace { usleep(20_000) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
            let stderr = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
            throw RigFailure(description: "fcrig \(name) did not finish within \(timeout) s (watchdog): \(stderr.suffix(2000))")
        }
        p.waitUntilExit()
        try out.close()
        try err.close()
        let stdout = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
        let last = stdout.split(separator: "\n").last.map(String.init) ?? ""
        guard let json = (try? JSONSerialization.jsonObject(with: Data(last.utf8))) as? [String: Any] else {
            throw RigFailure(description: "fcrig \(name) exited \(p.terminationStatus) without a JSON result: "
                             + "\(stdout.suffix(1000)) \(stderr.suffix(2000))")
        }
        if p.terminationStatus == 77 {
            throw XCTSkip("Firecracker case \(name) cannot run here: \(json["skip"] as? String ?? "?")")
        }
        guard p.terminationStatus == 0, flag(json, "passed") == true else {
            throw RigFailure(description: "fcrig \(name) exited \(p.terminationStatus): \(json["error"] as? String ?? last)")
        }
        return Outcome(json: json)
    }

    /// Every restored VM read `pages` pages, each verified by the guest (fcrig.py also checked the sum).
    private func assertVerified(_ o: Outcome, vms: Int, pages: Int, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(o.vms.count, vms, "\(o.json)", file: file, line: line)
        for vm in o.vms {
            XCTAssertEqual(number(vm, "pages"), Double(pages), "\(vm)", file: file, line: line)
            XCTAssertNotNil(vm["sum"] as? String, "\(vm)", file: file, line: line)
            XCTAssertGreaterThan(number(vm, "to_verified_ms") ?? 0, 0, "\(vm)", file: file, line: line)
        }
    }

    /// serve's summaries: every VM's faults were served (at least `faults`), none got the fallback.
    private func assertServed(_ o: Outcome, vms: Int, faults: Int, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(o.served.count, vms, "\(o.json)", file: file, line: line)
        for s in o.served {
            XCTAssertGreaterThanOrEqual(number(s, "faults") ?? 0, Double(faults), "\(s)", file: file, line: line)
            XCTAssertEqual(number(s, "fallbacks"), 0, "\(s)", file: file, line: line)
            XCTAssertEqual(number(s, "failures"), 0, "\(s)", file: file, line: line)
        }
    }

    /// Without a Firecracker binary the rig skips (exit 77) and says why, never passes silently.
    func testRigSkipsWithReasonWithoutFirecracker() throws {
        do {
            _ = try run("basic4k", environment: ["UFFDKIT_FIRECRACKER": "/nonexistent/firecracker"])
            XCTFail("the rig ran without a Firecracker binary")
        } catch let skip as XCTSkip {
            let text = "\(skip)"
            XCTAssertTrue(text.contains("/nonexistent/firecracker") && text.contains("not executable"), text)
        }
    }

    /// Each restart happened (mid-pass when `midPass`) and a new worker (another pid) took over.
    private func assertRestarted(_ o: Outcome, times: Int, midPass: Bool = true, file: StaticString = #filePath,
                                 line: UInt = #line) {
        let restarts = o.json["restarts"] as? [[String: Any]] ?? []
        XCTAssertEqual(restarts.count, times, "\(o.json)", file: file, line: line)
        for r in restarts {
            if midPass { XCTAssertGreaterThan(number(r, "at_page") ?? 0, 0, "\(r)", file: file, line: line) }
            XCTAssertNotNil(number(r, "worker_after"), "\(r)", file: file, line: line)
            XCTAssertNotEqual(number(r, "worker_after"), number(r, "worker_before"), "a new worker: \(r)", file: file, line: line)
        }
    }

    /// Rig case `rigCase` restarts the server `times` times while one guest faults through
    /// 128 MiB: the guest verifies every page, the server lives on, and each restart was mid-pass.
    private func assertGuestSurvivesRestarts(_ rigCase: String, times: Int, file: StaticString = #filePath,
                                             line: UInt = #line) throws {
        let o = try run(rigCase, timeout: 300)
        assertVerified(o, vms: 1, pages: 32768, file: file, line: line)
        assertServed(o, vms: 1, faults: 1, file: file, line: line)
        XCTAssertEqual(flag(o.json, "serve_alive_after"), true, file: file, line: line)
        assertRestarted(o, times: times, file: file, line: line)
    }

    /// The rig's own check can fail: one damaged page in the memory file is reported by address
    /// (File backend, no uffd involved).
    func testGuestDetectsADamagedPage() throws {
        let o = try run("corrupt")
        XCTAssertEqual(number(o.json, "bad_pages"), 1)
        XCTAssertEqual(o.json["first_bad"] as? String, "0x3388000")
    }

    /// The baseline: Firecracker's own File backend restores the guest and it verifies 32 MiB.
    func testFileBackendRestoreVerifies() throws {
        assertVerified(try run("file"), vms: 1, pages: 8192)
    }

    /// 4 KiB guest memory served by `uffdctl serve`: 32 MiB read in order after the restore.
    func testServeRestores4KiBGuest() throws {
        let o = try run("basic4k")
        assertVerified(o, vms: 1, pages: 8192)
        assertServed(o, vms: 1, faults: 8192)
        XCTAssertEqual(o.json["page_size"] as? String, "4K")
        // COPY installs 4 KiB pages: none of the guest memory is in huge pages (serve's last
        // measurement while the VM ran, reported in its `VM gone` summary).
        XCTAssertEqual(number(o.served.first, "huge_page_bytes"), 0, "\(o.served)")
        XCTAssertGreaterThan(number(o.served.first, "huge_page_of_bytes") ?? 0, 0, "\(o.served)")
    }

    /// The memory file behind an http:// URL (nginx started by the rig): `serve --memory-file
    /// http://…` restores the guest from 2 MiB chunks fetched on the deferred path; 32 MiB verified.
    func testServeRestoresFromHTTPURL() throws {
        let o = try run("http4k")
        assertVerified(o, vms: 1, pages: 8192)
        assertServed(o, vms: 1, faults: 16)
    }

    /// The same from a packed snapshot (zstd chunks, zero chunks not stored) behind the URL.
    func testServeRestoresFromPackedSnapshotURL() throws {
        let o = try run("httppacked")
        assertVerified(o, vms: 1, pages: 8192)
        assertServed(o, vms: 1, faults: 16)
    }

    /// A hugetlbfs-backed guest (`huge_pages: "2M"`): Firecracker hands over 2 MiB regions; the rig
    /// reserves huge pages and puts nr_hugepages back.
    func testServeRestores2MiBHugePageGuest() throws {
        let o = try run("huge2m")
        assertVerified(o, vms: 1, pages: 8192)
        assertServed(o, vms: 1, faults: 16)
        XCTAssertEqual(o.json["page_size"] as? String, "2M")
        XCTAssertGreaterThanOrEqual(number(o.vms.first, "huge_pages_in_use") ?? 0, 16, "the 32 MiB read are in 2 MiB pages")
        // serve measured it too: at least the 32 MiB the guest read are in huge pages.
        let huge = number(o.served.first, "huge_page_bytes") ?? 0, of = number(o.served.first, "huge_page_of_bytes") ?? 0
        XCTAssertGreaterThanOrEqual(huge, Double(32 << 20), "\(o.served)")
        XCTAssertLessThanOrEqual(huge, of, "\(o.served)")
    }

    /// Three VMs restored at the same time from one server, each reading a scattered 16 MiB.
    func testServeRestoresSeveralVMsAtOnce() throws {
        let o = try run("several", timeout: 300)
        assertVerified(o, vms: 3, pages: 4096)
        assertServed(o, vms: 3, faults: 4096)
        XCTAssertEqual(flag(o.json, "serve_alive_after"), true, "the server outlives its VMs")
    }

    /// Two 2 MiB (hugetlbfs) guests restored at once from one server.
    func testServeRestoresSeveral2MiBGuestsAtOnce() throws {
        let o = try run("several2m", timeout: 300)
        assertVerified(o, vms: 2, pages: 4096)
        assertServed(o, vms: 2, faults: 8)
        XCTAssertEqual(o.json["page_size"] as? String, "2M")
    }

    /// `serve --readahead 64K`: the guest reads all 128 MiB in scattered order, so every page a
    /// window installed ahead of a fault is checked; far fewer faults than pages.
    func testServeReadaheadInstallsCorrectPages() throws {
        let o = try run("readahead", timeout: 300)
        assertVerified(o, vms: 1, pages: 32768)
        assertServed(o, vms: 1, faults: 1)
        XCTAssertLessThan(number(o.served.first, "faults") ?? .infinity, 16384, "windows installed pages ahead")
    }

    /// `serve --once` serves one restored VM (a scattered 32 MiB) and exits 0 once that VM is gone.
    func testServeOnceExitsCleanlyAfterItsVM() throws {
        let o = try run("once")
        assertVerified(o, vms: 1, pages: 8192)
        assertServed(o, vms: 1, faults: 8192)
        XCTAssertEqual(number(o.json, "serve_exit"), 0)
    }

    /// Issue 12: one restore recorded (`serve --record-working-set`), a second restore of the same
    /// snapshot served with `--prefetch` of that recording: both guests verify every page; the
    /// filler installed every recorded page (none skipped) and left at most half to faults.
    func testServePrefetchesARecordedWorkingSet() throws {
        let o = try run("prefetch")
        assertVerified(o, vms: 2, pages: 8192)
        let recorded = number(o.json, "recorded_pages") ?? 0
        XCTAssertGreaterThanOrEqual(recorded, 8192, "\(o.json)")
        let p = o.json["prefetch"] as? [String: Any]
        func n(_ k: String) -> Double? { (p?[k] as? String).flatMap(Double.init) ?? number(p, k) }
        XCTAssertEqual(n("prefetch_planned_pages"), recorded, "\(o.json)")
        XCTAssertEqual((n("prefetched_pages") ?? 0) + (n("prefetch_already_present_pages") ?? 0), recorded, "\(o.json)")
        XCTAssertEqual(n("prefetch_skipped_pages"), 0, "\(o.json)")
        XCTAssertLessThanOrEqual(n("faults") ?? .infinity, 4096, "\(o.json)")
    }

    /// Restores that arrive while the server restarts: one hand-off right after SIGHUP, one right
    /// after `kill -9` of the worker; each waits in the inherited socket's backlog for the next
    /// worker, and both guests verify 32 MiB.
    func testRestoreArrivingDuringServeRestart() throws {
        let o = try run("restartatload")
        assertVerified(o, vms: 2, pages: 8192)
        assertServed(o, vms: 2, faults: 0)
        assertRestarted(o, times: 2, midPass: false)
    }

    /// A VM killed while its faults are in flight does not harm the server: the next VM restored
    /// from the same server reads and verifies all 128 MiB.
    func testVMKilledMidRestoreLeavesServerServing() throws {
        let o = try run("vmkilled", timeout: 300)
        assertVerified(o, vms: 1, pages: 32768)
        XCTAssertGreaterThan(number(o.json, "killed_vm_faults") ?? 0, 0, "the first VM was faulting when killed")
        XCTAssertEqual(flag(o.json, "serve_alive_after"), true)
    }

    /// The server is restarted with SIGHUP twice while the restored guest is faulting its way
    /// through 128 MiB; the guest keeps running and verifies every page.
    func testRestoreSurvivesServeRestartBySIGHUP() throws { try assertGuestSurvivesRestarts("sighup", times: 2) }

    /// serve's worker is killed with SIGKILL three times mid-pass; the supervisor starts a new one
    /// each time and the guest still verifies every page.
    func testRestoreSurvivesKill9OfServeWorker() throws { try assertGuestSurvivesRestarts("kill9", times: 3) }
}
