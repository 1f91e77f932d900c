import CUffd
import CUffdTestSupport
import Foundation
import XCTest

/// One case of the C test table on one memory type, as the log names it (`copy_shmem_private`).
struct CCase {
    let row: UnsafePointer<cuffd_test_case>
    let memKind: Int32
    var label: String {
        var buf = [CChar](repeating: 0, count: 128)
        cuffd_test_case_label(row, memKind, &buf, buf.count)
        return buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}

/// The cases of one group of the table (one C file), each row on each memory type it names.
func cCases(group: String) -> [CCase]? {
    guard let g = (0..<cuffd_test_group_count()).first(where: { String(cString: cuffd_test_group_name($0)) == group })
    else { return nil }
    var out: [CCase] = []
    for i in 0..<cuffd_test_case_count(g) {
        let row = cuffd_test_case_at(g, i)!
        let mems = row.pointee.mems
        if mems == 0 { out.append(CCase(row: row, memKind: Int32(CUFFD_MEM_ANON.rawValue))); continue }
        for k in 0..<32 where mems & (1 << k) != 0 { out.append(CCase(row: row, memKind: Int32(k))) }
    }
    return out
}

/// `UFFDKIT_CTEST=copy_anon,loop_wp` runs only the cases whose label contains one of the words.
let cCaseFilter: [String] = (ProcessInfo.processInfo.environment["UFFDKIT_CTEST"] ?? "")
    .split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }

/// Runs one case in a forked child with a watchdog (`cuffd_test_run_case`): its CUFFD_TEST_*
/// outcome and the case's message.
func runCCase(_ c: CCase, timeout: Int32) -> (rc: Int32, message: String) {
    var buf = [CChar](repeating: 0, count: 1024)
    let rc = cuffd_test_run_case(c.row, c.memKind, timeout, &buf, buf.count)
    return (rc, buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
}

/// The one path every C test takes: each case of `group` runs in a forked child with a watchdog
/// (`cuffd_test_run_case`); the log gets one line per case (`C test copy_anon: passed`), a
/// failure is recorded with the case's label, a skip prints its reason. When every case that
/// ran skipped, the XCTest skips with their reasons.
func runCGroup(_ group: String, timeout: Int32 = 30, file: StaticString = #filePath, line: UInt = #line) throws {
    guard let cases = cCases(group: group) else {
        return XCTFail("the C test table has no group \(group)", file: file, line: line)
    }
    XCTAssertFalse(cases.isEmpty, "group \(group) has no cases", file: file, line: line)
    var ran = 0
    var skips: [String] = []
    for c in cases {
        let label = c.label
        if !cCaseFilter.isEmpty && !cCaseFilter.contains(where: { label.contains($0) }) { continue }
        ran += 1
        let start = Date()
        let (rc, message) = runCCase(c, timeout: timeout)
        let secs = String(format: "%.2f s", Date().timeIntervalSince(start))
        switch rc {
        case Int32(CUFFD_TEST_PASS.rawValue):
            print("C test \(label): passed (\(secs))")
        case Int32(CUFFD_TEST_SKIP.rawValue):
            print("C test \(label): skipped: \(message)")
            skips.append("\(label): \(message)")
        default:
            print("C test \(label): FAILED: \(message)")
            XCTFail("\(label): \(message.isEmpty ? "failed without a message" : message)", file: file, line: line)
        }
    }
    if ran == 0 { throw XCTSkip("no case of group \(group) matches UFFDKIT_CTEST=\(cCaseFilter.joined(separator: ","))") }
    if skips.count == ran { throw XCTSkip("every case skipped: " + skips.joined(separator: "; ")) }
}

/// Base class for test classes with hugetlb cases: reserves default-size huge pages for the
/// class and gives the old nr_hugepages back afterwards. When the reservation fails (not root,
/// no hugetlb), the hugetlb cases skip with the reason from the mapping attempt.
class HugetlbReservingTestCase: XCTestCase {
    /// Enough for the largest hugetlb case (a few fixtures of at most CT_HUGE_MAX_PAGES of
    /// 2 MiB; a hugetlb-private fixture reserves its private pages besides the file's).
    static let hugePagesNeeded = 48

    override class func setUp() {
        super.setUp()
        _ = cuffd_test_hugetlb_reserve(hugePagesNeeded)
    }

    override class func tearDown() {
        cuffd_test_hugetlb_restore()
        super.tearDown()
    }
}
