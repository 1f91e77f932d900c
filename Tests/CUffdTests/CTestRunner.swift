import CUffd
import CUffdTestSupport
import XCTest

/// The memory types the C tests run on (`enum cuffd_mem_kind`).
enum MemKind: Int32 {
    case anon = 0
    case shmem = 1
    case shmemPrivate = 2
    case hugetlb = 3
}

/// Runs one C test in a forked child with a watchdog (`cuffd_test_run_isolated`) and maps its
/// result: PASS returns, SKIP throws XCTSkip with the test's reason, FAIL records its message.
func runCTest(
    _ test: cuffd_test_fn, _ kind: MemKind = .anon, timeout: Int32 = 30,
    file: StaticString = #filePath, line: UInt = #line
) throws {
    var buf = [CChar](repeating: 0, count: 1024)
    let rc = buf.withUnsafeMutableBufferPointer {
        cuffd_test_run_isolated(test, kind.rawValue, timeout, $0.baseAddress, $0.count)
    }
    let message = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    switch rc {
    case Int32(CUFFD_TEST_PASS.rawValue):
        return
    case Int32(CUFFD_TEST_SKIP.rawValue):
        throw XCTSkip(message, file: file, line: line)
    default:
        XCTFail(message.isEmpty ? "C test failed without a message" : message, file: file, line: line)
    }
}

/// Base class for test classes with hugetlb cases: reserves default-size huge pages for the
/// class and gives the old nr_hugepages back afterwards. When the reservation fails (not root,
/// no hugetlb), the hugetlb cases skip with the reason from the mapping attempt.
class HugetlbReservingTestCase: XCTestCase {
    /// Enough for the largest hugetlb case (a few regions of up to 8 pages of 2 MiB).
    static let hugePagesNeeded = 32

    override class func setUp() {
        super.setUp()
        _ = cuffd_test_hugetlb_reserve(hugePagesNeeded)
    }

    override class func tearDown() {
        cuffd_test_hugetlb_restore()
        super.tearDown()
    }
}
