import CUffdTestSupport
import XCTest

/// UFFDIO_WRITEPROTECT, WP faults, WP_UNPOPULATED markers and WP_ASYNC + PAGEMAP_SCAN.
final class WriteProtectTests: HugetlbReservingTestCase {
    /// Protected pages read without faults; writes fault once per page with WRITE|WP; unprotect
    /// and re-protect behave.
    func testWriteProtect_anon() throws { try runCTest(cuffd_test_wp, .anon) }
    func testWriteProtect_shmem() throws { try runCTest(cuffd_test_wp, .shmem) }
    func testWriteProtect_shmemPrivate() throws { try runCTest(cuffd_test_wp, .shmemPrivate) }
    func testWriteProtect_hugetlb() throws { try runCTest(cuffd_test_wp, .hugetlb) }

    /// WP_UNPOPULATED: writes to never-touched protected anon pages are WP faults.
    func testWriteProtectUnpopulated_anon() throws { try runCTest(cuffd_test_wp_unpopulated, .anon) }

    /// WP_ASYNC: writes resolve in the kernel; PAGEMAP_SCAN reports exactly the written pages and re-protects.
    func testAsyncDirtyTracking_anon() throws { try runCTest(cuffd_test_wp_async_scan, .anon) }
    func testAsyncDirtyTracking_shmem() throws { try runCTest(cuffd_test_wp_async_scan, .shmem) }
    func testAsyncDirtyTracking_shmemPrivate() throws { try runCTest(cuffd_test_wp_async_scan, .shmemPrivate) }
    func testAsyncDirtyTracking_hugetlb() throws { try runCTest(cuffd_test_wp_async_scan, .hugetlb) }

    /// WP_ASYNC implies WP_UNPOPULATED: granted reports it, and a first write to a never-touched page is tracked.
    func testAsyncImpliesUnpopulated_anon() throws { try runCTest(cuffd_test_wp_async_unpopulated, .anon) }
}
