import Foundation
import XCTest

/// End-to-end: each subcommand runs a real session in the built binary; JSON is parsed and checked.
final class SessionCommandTests: XCTestCase {
    private let mib4 = 4 << 20

    /// The common fields every session object carries, checked for sense.
    private func checkSession(_ j: [String: Any]?, operation: String, bytes: Int, faults: Int? = nil,
                              verifiedBytes: Int? = nil, file: StaticString = #filePath, line: UInt = #line) {
        guard let j else { return XCTFail("stdout is not one JSON object", file: file, line: line) }
        XCTAssertEqual(j["operation"] as? String, operation, file: file, line: line)
        XCTAssertEqual(number(j, "bytes"), Double(bytes), file: file, line: line)
        XCTAssertEqual(flag(j, "verified"), true, "every byte must match", file: file, line: line)
        XCTAssertEqual(number(j, "verified_bytes"), Double(verifiedBytes ?? bytes), file: file, line: line)
        if let faults { XCTAssertEqual(number(j, "faults"), Double(faults), file: file, line: line) }
        let seconds = number(j, "seconds") ?? -1
        XCTAssertGreaterThan(seconds, 0, file: file, line: line)
        XCTAssertGreaterThan(number(j, "gbps") ?? -1, 0, file: file, line: line)
        let lat = j["fault_latency_us"] as? [String: Any]
        XCTAssertNotNil(lat, file: file, line: line)
        if (faults ?? 1) > 0 {
            let p50 = number(lat, "p50") ?? -1, p99 = number(lat, "p99") ?? -1
            XCTAssertGreaterThan(p50, 0, file: file, line: line)
            XCTAssertGreaterThanOrEqual(p99, p50, file: file, line: line)
        }
    }

    /// `uffdctl copy` with no options is the README's main job: 64 MiB anon, pattern, 2 threads.
    func testCopyDefaultSession() throws {
        let r = try runUffdctl(["copy"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("copy: 64.0 MiB anon"), r.stdout)
        XCTAssertTrue(r.stdout.contains("2 threads"), r.stdout)
        XCTAssertTrue(r.stdout.contains("faults       16384 (missing 16384"), r.stdout)
        XCTAssertTrue(r.stdout.contains("verified     every byte of 64.0 MiB matched the pattern"), r.stdout)
    }

    func testCopyJSONRandomWritesThreeThreads() throws {
        let r = try runUffdctl(["copy", "--size", "4M", "--threads", "3", "--access", "random", "--write", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "copy", bytes: mib4, faults: 1024)
        XCTAssertEqual((r.json?["resolutions"] as? [String: Any]).flatMap { number($0, "copy") }, 1024)
        XCTAssertEqual(r.json?["source"] as? String, "pattern")
    }

    func testPinnedSession() throws {
        let r = try runUffdctl(["copy", "--size", "4M", "--pin", "0", "--readers", "2", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "copy", bytes: mib4, faults: 1024)
        XCTAssertEqual(number(r.json, "pinned_cpu"), 0)
        XCTAssertEqual(number(r.json, "readers"), 2)
    }

    func testCopyZeroSourceShmem() throws {
        let r = try runUffdctl(["copy", "--size", "4M", "--memory", "shmem", "--source", "zero", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "copy", bytes: mib4, faults: 1024)
        XCTAssertEqual(r.json?["memory"] as? String, "shmem")
    }

    /// A file of 5 MiB + 123 random bytes is loaded lazily and compared byte for byte.
    func testCopyFromOddSizedFile() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-odd-\(UUID().uuidString).bin")
        let length = 5 << 20 + 123
        let random = try XCTUnwrap(FileHandle(forReadingAtPath: "/dev/urandom"))
        let bytes = random.readData(ofLength: length)
        try random.close()
        XCTAssertEqual(bytes.count, length)
        try bytes.write(to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        let region = (length + 4095) / 4096 * 4096
        // The per-fault copy path (the default window installer, which resolves faults itself
        // and so has no per-resolution latency, is CopyInstallTests').
        for extra in [["--install", "off"], ["--readahead", "adaptive"], ["--readahead", "64K", "--access", "random", "--threads", "4"]] {
            let r = try runUffdctl(["copy", "--source", "file:\(url.path)", "--json"] + extra)
            XCTAssertEqual(r.code, 0, "\(extra): \(r.stderr)")
            checkSession(r.json, operation: "copy", bytes: region)
            XCTAssertEqual(number(r.json, "file_bytes"), Double(length))
            XCTAssertEqual(number(r.json, "resolved_bytes"), Double(region), "\(extra)")
        }
        // The file decides the size; a different file must not verify against this one.
        let r = try runUffdctl(["copy", "--source", "file:\(url.path)"])
        XCTAssertTrue(r.stdout.contains("file 5243003 bytes, region 5246976 bytes, tail 3973 bytes zero"), r.stdout)
    }

    func testZeropageSession() throws {
        let text = try runUffdctl(["zeropage", "--size", "4M"])
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("matched zeros"), text.stdout)
        let r = try runUffdctl(["zeropage", "--size", "4M", "--write", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "zeropage", bytes: mib4, faults: 1024)
        XCTAssertEqual((r.json?["resolutions"] as? [String: Any]).flatMap { number($0, "zeropage") }, 1024)
    }

    func testMoveSessionWithCopyComparison() throws {
        let r = try runUffdctl(["move", "--size", "4M", "--compare-copy", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "move", bytes: mib4, faults: 1024)
        XCTAssertEqual(number(r.json, "moved_granules"), 1024)
        let cmp = r.json?["compare_copy"] as? [String: Any]
        XCTAssertEqual(flag(cmp, "verified"), true)
        XCTAssertGreaterThan(number(cmp, "copy_over_move") ?? 0, 0)
        XCTAssertEqual(number(cmp, "faults"), 1024)
    }

    func testMoveHuge() throws {
        let r = try runUffdctl(["move", "--huge", "--size", "8M", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "move", bytes: 8 << 20, faults: 4)
        XCTAssertEqual(number(r.json, "granule"), Double(2 << 20))
        let bad = try runUffdctl(["move", "--huge", "--size", "3M"])
        XCTAssertEqual(bad.code, 2)
        XCTAssertTrue(bad.stderr.contains("multiple of 2 MiB"), bad.stderr)
    }

    func testContinueSession() throws {
        let text = try runUffdctl(["continue", "--size", "4M"])
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("minor 1024"), text.stdout)
        let r = try runUffdctl(["continue", "--size", "4M", "--write", "--threads", "4", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "continue", bytes: mib4, faults: 1024)
        XCTAssertEqual((r.json?["faults_by_kind"] as? [String: Any]).flatMap { number($0, "minor") }, 1024)
        XCTAssertEqual((r.json?["checks"] as? [String: Any]).flatMap { flag($0, "second_view_agrees") }, true)
        let anon = try runUffdctl(["continue", "--memory", "anon"])
        XCTAssertEqual(anon.code, 2)
        XCTAssertTrue(anon.stderr.contains("shmem or hugetlb"), anon.stderr)
    }

    func testWriteProtectSyncAsyncAndSnapshot() throws {
        let sync = try runUffdctl(["writeprotect", "--size", "4M", "--json"])
        XCTAssertEqual(sync.code, 0, sync.stderr)
        checkSession(sync.json, operation: "writeprotect", bytes: mib4, faults: 256)
        XCTAssertEqual(number(sync.json, "dirty_pages"), 256)
        XCTAssertEqual(number(sync.json, "expected_dirty_pages"), 256)

        let async = try runUffdctl(["writeprotect", "--size", "4M", "--async", "--every", "3", "--json"])
        XCTAssertEqual(async.code, 0, async.stderr)
        checkSession(async.json, operation: "writeprotect", bytes: mib4, faults: 0)
        XCTAssertEqual(number(async.json, "dirty_pages"), 342)

        let snap = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-snap-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: snap) }
        let s = try runUffdctl(["writeprotect", "--size", "8M", "--every", "1", "--access", "random",
                                "--snapshot", snap.path, "--json"])
        XCTAssertEqual(s.code, 0, s.stderr)
        checkSession(s.json, operation: "writeprotect", bytes: 8 << 20, faults: 2048)
        XCTAssertEqual(flag(s.json, "snapshot_verified"), true)
        let attrs = try FileManager.default.attributesOfItem(atPath: snap.path)
        XCTAssertEqual((attrs[.size] as? NSNumber)?.intValue, 8 << 20)

        let both = try runUffdctl(["writeprotect", "--async", "--snapshot", snap.path])
        XCTAssertEqual(both.code, 2)
    }

    func testPoisonRaisesSIGBUSInChildren() throws {
        let r = try runUffdctl(["poison", "--size", "4M", "--pages", "0,7,1023", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        checkSession(r.json, operation: "poison", bytes: mib4, faults: 1024, verifiedBytes: mib4 - 3 * 4096)
        XCTAssertEqual(number(r.json, "sigbus_children"), 3)
        XCTAssertEqual(number(r.json, "skipped_pages"), 3)
        XCTAssertEqual((r.json?["resolutions"] as? [String: Any]).flatMap { number($0, "poison") }, 3)
        let children = r.json?["children"] as? [[String: Any]] ?? []
        XCTAssertEqual(children.compactMap { $0["child"] as? String }, ["SIGBUS", "SIGBUS", "SIGBUS"])

        let text = try runUffdctl(["poison", "--size", "4M"])
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("child        touched page 512: SIGBUS"), text.stdout)
    }

    /// Forks in quick succession: the next fork must not come while the handler's reader is
    /// still setting up the previous child's handler (fork holds malloc's locks while the kernel
    /// waits for that reader: both hung, about one run in three with 13 children, before).
    func testPoisonManyChildrenNeverHangs() throws {
        let pages = [0, 7, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1023]
        for _ in 0..<4 {
            let r = try runUffdctl(["poison", "--size", "4M", "--pages", pages.map(String.init).joined(separator: ","),
                                    "--json", "--quiet"], timeout: 30)
            XCTAssertEqual(r.code, 0, r.stderr)
            XCTAssertEqual(number(r.json, "sigbus_children"), Double(pages.count))
        }
    }

    func testBenchUffdKitRowsJSON() throws {
        let r = try runUffdctl(["bench", "--filter", "uffdkit", "--pages", "256", "--json", "--quiet"], timeout: 120)
        XCTAssertEqual(r.code, 0, r.stderr)
        let results = r.json?["results"] as? [[String: Any]] ?? []
        let names = Set(results.compactMap { $0["name"] as? String })
        for n in ["baseline.first-touch", "uffdkit.copy", "uffdkit.zeropage", "uffdkit.move", "uffdkit.continue",
                  "uffdkit.wp", "uffdkit.wp-async"] {
            XCTAssertTrue(names.contains(n), "missing \(n) in \(names)")
        }
        for row in results where (row["name"] as? String)?.hasPrefix("uffdkit.") == true {
            XCTAssertGreaterThan(number(row, "medianNsPerPage") ?? 0, 0, "\(row)")
            XCTAssertGreaterThan(number(row, "ratioMedian") ?? 0, 0, "\(row)")
            XCTAssertEqual(row["baseline"] as? String, "baseline.first-touch")
        }
        let table = try runUffdctl(["bench", "--filter", "uffdkit.copy", "--pages", "128", "--quiet"], timeout: 120)
        XCTAssertEqual(table.code, 0, table.stderr)
        XCTAssertTrue(table.stdout.contains("uffdkit.copy"), table.stdout)
        XCTAssertTrue(table.stdout.contains("x base"), table.stdout)
    }

    func testFeaturesJSON() throws {
        let r = try runUffdctl(["features", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        let j = r.json
        XCTAssertEqual(number(j, "api"), 0xAA)
        let features = j?["features"] as? [[String: Any]] ?? []
        XCTAssertTrue(features.contains { $0["name"] as? String == "MOVE" && number($0, "bit") == 16 })
        XCTAssertTrue(features.allSatisfy { $0["supported"] != nil })
        XCTAssertFalse((j?["ioctls"] as? [String] ?? []).isEmpty)
        XCTAssertNotNil(j?["environment"] as? [String: Any])
    }

    /// `features` asks UffdKit for the ioctls of a probe registration of every memory type:
    /// anon offers no CONTINUE (no page cache), shmem does; hugetlb is listed or says why not.
    func testFeaturesRangeIoctlsPerMemoryType() throws {
        let r = try runUffdctl(["features", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        let ranges = r.json?["range_ioctls"] as? [String: [String]] ?? [:]
        let modes = r.json?["range_modes"] as? [String: String] ?? [:]
        let errors = r.json?["range_probe_errors"] as? [String: String] ?? [:]
        XCTAssertTrue(ranges["anon"]?.contains("COPY") == true, "\(ranges)")
        XCTAssertFalse(ranges["anon"]?.contains("CONTINUE") ?? true, "\(ranges)")
        XCTAssertEqual(modes["anon"], "missing|writeProtect")
        for memory in ["shmem", "shmem-private"] {
            XCTAssertTrue(ranges[memory]?.contains("CONTINUE") == true, "\(memory): \(ranges)")
            XCTAssertEqual(modes[memory], "missing|writeProtect|minor")
        }
        XCTAssertTrue(ranges["hugetlb"] != nil || errors["hugetlb"] != nil, "hugetlb neither probed nor explained")
        let text = try runUffdctl(["features"])
        XCTAssertTrue(text.stdout.contains("ioctls (shmem)"), text.stdout)
    }

    /// Every session prints one report shape: the same common fields (from SessionReport's
    /// Codable summary), whichever subcommand fed the session runner.
    func testEverySessionReportsTheCommonFields() throws {
        let common = ["operation", "memory", "size", "page_size", "threads", "access", "write", "readers",
                      "pinned_cpu", "faults", "faults_by_kind", "resolutions", "bytes", "resolved_bytes", "existed",
                      "fallbacks", "failures", "verified", "verified_bytes", "mismatched_pages", "skipped_pages",
                      "expected", "seconds", "gbps", "us_per_fault", "fault_latency_us"]
        let runs: [[String]] = [["copy"], ["zeropage"], ["move"], ["continue"], ["writeprotect"],
                                ["writeprotect", "--async"], ["poison"]]
        for args in runs {
            let r = try runUffdctl(args + ["--size", "1M", "--json", "--quiet"])
            XCTAssertEqual(r.code, 0, "\(args): \(r.stderr)")
            let keys = Set(r.json?.keys.map { $0 } ?? [])
            XCTAssertEqual(Set(common).subtracting(keys), [], "\(args) lacks common fields")
            XCTAssertEqual(r.json?["operation"] as? String, args[0])
            XCTAssertTrue(r.json?["pinned_cpu"] is NSNull, "\(args): unpinned is null")
            XCTAssertEqual(flag(r.json, "verified"), true, "\(args)")
        }
    }

    /// A fault the policy cannot resolve gets the fallback (a zero page), the worker goes on,
    /// verification fails and the session exits 1 naming the failure; nothing hangs or crashes.
    func testPolicyFailureExitsOne() throws {
        let r = try runUffdctl(["copy", "--size", "1M", "--fail-pages", "3,7", "--json"], timeout: 30)
        XCTAssertEqual(r.code, 1, r.stderr)
        XCTAssertEqual(flag(r.json, "verified"), false)
        XCTAssertEqual(number(r.json, "fallbacks"), 2)
        XCTAssertEqual(number(r.json, "mismatched_pages"), 2)
        XCTAssertEqual(number(r.json, "first_mismatch_offset"), 3 * 4096)
        XCTAssertTrue(r.stderr.contains("2 faults were not resolved by the policy"), r.stderr)
        XCTAssertTrue(r.stderr.contains("injected failure"), r.stderr)
    }

    /// The watchdog ends a session that does not finish in time: exit 1, never a hang.
    func testWatchdogEndsTheSession() throws {
        let r = try runUffdctl(["copy", "--size", "512M", "--timeout", "0.01"], timeout: 30)
        XCTAssertEqual(r.code, 1, r.stdout + r.stderr)
        XCTAssertTrue(r.stderr.contains("watchdog"), r.stderr)
    }

    func testHelpDocumentsExitCodes() throws {
        let r = try runUffdctl(["--help"])
        XCTAssertEqual(r.code, 0)
        for s in ["0  success", "1  an operation failed", "2  bad usage or input", "3  the kernel or permissions"] {
            XCTAssertTrue(r.stdout.contains(s), "missing '\(s)' in --help")
        }
        for sub in ["copy", "zeropage", "move", "continue", "writeprotect", "poison", "bench", "features"] {
            XCTAssertTrue(r.stdout.contains("  \(sub) "), "missing \(sub) in --help")
            let h = try runUffdctl([sub, "--help"])
            XCTAssertEqual(h.code, 0)
            XCTAssertTrue(h.stdout.contains("Exit codes: 0 success, 1 an operation failed"), "\(sub) --help")
        }
    }
}
