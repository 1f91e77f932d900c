import Foundation
import XCTest

/// `uffdctl bench`'s issue-14 limit rows end to end: the fresh-memory rows (pread into freshly
/// populated huge-page windows), the install rows' ratio to them (their `limit`), priming on and off, and the machine's free-page-reporting field. A wrong byte fails a run
/// (-EILSEQ), which these checks see as failures.
final class BenchLimitRowsTests: XCTestCase {
    private func rows(_ j: [String: Any]?) -> [String: [String: Any]] {
        let results = j?["results"] as? [[String: Any]] ?? []
        return Dictionary(results.compactMap { r in (r["name"] as? String).map { ($0, r) } }, uniquingKeysWith: { a, _ in a })
    }

    func testFreshLimitRowsRunCheckedAndJudged() throws {
        let r = try runUffdctl(["bench", "--filter", "file.tmp.warm.install-2m", "--file-size", "16M",
                                "--file-dir", "/var/tmp", "--no-uffdkit", "--json", "--quiet"], timeout: 300)
        XCTAssertEqual(r.code, 0, r.stderr)
        let byName = rows(r.json)
        // (row, baseline it is interleaved with, limit row it is also divided by)
        let judged: [(String, String, String?)] = [
            ("file.tmp.warm.pread-2m-fresh", "file.tmp.warm.pread-2m", nil),
            ("file.tmp.warm.pread-2m-fresh-2t", "file.tmp.warm.pread-2m", nil),
            ("file.tmp.warm.install-2m", "file.tmp.warm.pread-2m", "file.tmp.warm.pread-2m-fresh-2t"),
            ("file.tmp.warm.install-2m-nofill", "file.tmp.warm.pread-2m", "file.tmp.warm.pread-2m-fresh"),
            ("file.tmp.warm.install-2m-random-2t", "file.tmp.warm.pread-2m", "file.tmp.warm.pread-2m-fresh-2t"),
        ]
        for (name, baseline, limit) in judged {
            guard let row = byName[name] else { XCTFail("missing \(name) in \(byName.keys.sorted())"); continue }
            XCTAssertEqual(row["baseline"] as? String, baseline, name)
            XCTAssertEqual(number(row, "runs"), 5, name)
            XCTAssertEqual(number(row, "failures"), 0, "\(name): \(row["error"] ?? "")")
            XCTAssertGreaterThan(number(row, "medianNsPerPage") ?? 0, 0, name)
            // Interleaved with its baseline: the ratio comes from the baseline runs next to it.
            XCTAssertGreaterThan(number(row, "pairedBaselineMedianNsPerPage") ?? 0, 0, name)
            XCTAssertGreaterThan(number(row, "ratioMedian") ?? 0, 0, name)
            XCTAssertEqual(row["limit"] as? String, limit, name)
            if let limit {
                // The limit row was selected by the filter's closure and ran; the ratio is row / limit.
                let lim = number(byName[limit], "medianNsPerPage") ?? 0
                XCTAssertGreaterThan(lim, 0, limit)
                XCTAssertEqual(number(row, "limitRatioMedian") ?? 0, (number(row, "medianNsPerPage") ?? 0) / lim,
                               accuracy: 1e-9, name)
            }
        }
        // The 2-thread rows name both CPUs when the machine has two.
        if ProcessInfo.processInfo.activeProcessorCount > 1 {
            XCTAssertEqual(byName["file.tmp.warm.pread-2m-fresh-2t"]?["placement"] as? String, "F0,1x2")
        }
        let reporting = (r.json?["machine"] as? [String: Any])?["pageReporting"] as? String
        XCTAssertTrue(reporting == "off" || reporting?.hasPrefix("order ") == true, "pageReporting \(reporting ?? "nil")")
    }

    func testNoPrimeRunsAndTableNamesPageReporting() throws {
        let r = try runUffdctl(["bench", "--filter", "file.tmp.warm.pread-2m-fresh", "--file-size", "8M",
                                "--file-dir", "/var/tmp", "--no-uffdkit", "--no-prime", "--quiet"], timeout: 300)
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("file.tmp.warm.pread-2m-fresh-2t"), r.stdout)
        XCTAssertTrue(r.stdout.contains(", page reporting "), r.stdout)
        XCTAssertFalse(r.stdout.contains("FAILED"), r.stdout)
    }
}
