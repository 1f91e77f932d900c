import Foundation
import XCTest
@testable import uffdctl

/// SessionReport is Codable: a session's JSON decodes into it (details kept beside the common
/// summary) and encodes back to the same object.
final class SessionReportTests: XCTestCase {
    func testSessionJSONRoundTrips() throws {
        let r = try runUffdctl(["move", "--size", "1M", "--compare-copy", "--json", "--quiet"])
        XCTAssertEqual(r.code, 0, r.stderr)
        let report = try JSONDecoder().decode(SessionReport.self, from: Data(r.stdout.utf8))
        XCTAssertEqual(report.operation, "move")
        XCTAssertEqual(report.memory, .anon)
        XCTAssertEqual(report.faults, 256)
        XCTAssertTrue(report.verified)
        XCTAssertNil(report.pinnedCPU)
        XCTAssertEqual(report.checks, ["copy_verified": true])
        XCTAssertEqual(report.details["granule"], 4096)
        XCTAssertEqual(report.details["moved_granules"], 256)
        guard case .object(let compare)? = report.details["compare_copy"] else {
            return XCTFail("compare_copy is not an object: \(String(describing: report.details["compare_copy"]))")
        }
        XCTAssertEqual(compare["verified"], true)
        XCTAssertNil(report.details["faults"], "common fields are not details")

        let again = try JSONSerialization.jsonObject(with: Data(report.jsonString().utf8)) as? NSDictionary
        let original = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? NSDictionary
        XCTAssertEqual(again, original)
    }

    /// A failed check makes the report unverified and names the check when emitted.
    func testFailedCheckFailsTheSession() throws {
        var notes = SessionNotes()
        notes.checks.append(.init(key: "k", text: "the thing held", ok: false))
        let summary = SessionSummary(
            operation: "test", memory: .anon, size: 4096, pageSize: 4096, threads: 1, access: .seq, write: false,
            readers: 1, pin: nil, seconds: 1, stats: nil,
            verification: Verification(checkedBytes: 4096, mismatchedPages: 0, firstMismatch: nil, skippedPages: 0),
            expected: "zeros", firstFailure: nil, checks: notes.checks)
        XCTAssertFalse(summary.verified)
        XCTAssertTrue(summary.bytesMatched)
        let report = SessionReport(summary: summary, notes: notes)
        XCTAssertTrue(report.text().contains("check        FAILED: the thing held"), report.text())
        XCTAssertThrowsError(try report.emit(json: true)) { error in
            XCTAssertEqual((error as? CLIError)?.exitCode, .failed)
            XCTAssertEqual((error as? CLIError)?.message, "test: the thing held")
        }
    }
}
