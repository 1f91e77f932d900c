import CUffdTestSupport
import XCTest

/// COPY, ZEROPAGE, CONTINUE and POISON: exact ranges, EEXIST on repeat, partial progress.
final class ResolveTests: HugetlbReservingTestCase {
    func testCopy_anon() throws { try runCTest(cuffd_test_copy, .anon) }
    func testCopy_shmem() throws { try runCTest(cuffd_test_copy, .shmem) }
    func testCopy_shmemPrivate() throws { try runCTest(cuffd_test_copy, .shmemPrivate) }
    func testCopy_hugetlb() throws { try runCTest(cuffd_test_copy, .hugetlb) }

    func testCopyPartialProgress_anon() throws { try runCTest(cuffd_test_copy_partial, .anon) }
    func testCopyPartialProgress_shmem() throws { try runCTest(cuffd_test_copy_partial, .shmem) }
    func testCopyPartialProgress_shmemPrivate() throws { try runCTest(cuffd_test_copy_partial, .shmemPrivate) }
    func testCopyPartialProgress_hugetlb() throws { try runCTest(cuffd_test_copy_partial, .hugetlb) }

    func testMissingFaultsResolvedByCopy_anon() throws { try runCTest(cuffd_test_copy_fault, .anon) }
    func testMissingFaultsResolvedByCopy_shmem() throws { try runCTest(cuffd_test_copy_fault, .shmem) }
    func testMissingFaultsResolvedByCopy_shmemPrivate() throws { try runCTest(cuffd_test_copy_fault, .shmemPrivate) }
    func testMissingFaultsResolvedByCopy_hugetlb() throws { try runCTest(cuffd_test_copy_fault, .hugetlb) }

    func testZeropage_anon() throws { try runCTest(cuffd_test_zeropage, .anon) }
    func testZeropage_shmem() throws { try runCTest(cuffd_test_zeropage, .shmem) }
    func testZeropage_shmemPrivate() throws { try runCTest(cuffd_test_zeropage, .shmemPrivate) }
    /// hugetlb has no zero page: the range lacks ZEROPAGE and the ioctl gives EINVAL.
    func testZeropageRefused_hugetlb() throws { try runCTest(cuffd_test_zeropage, .hugetlb) }

    func testContinue_shmem() throws { try runCTest(cuffd_test_continue, .shmem) }
    func testContinue_shmemPrivate() throws { try runCTest(cuffd_test_continue, .shmemPrivate) }
    func testContinue_hugetlb() throws { try runCTest(cuffd_test_continue, .hugetlb) }

    func testPoison_anon() throws { try runCTest(cuffd_test_poison, .anon) }
    func testPoison_shmem() throws { try runCTest(cuffd_test_poison, .shmem) }
    func testPoison_shmemPrivate() throws { try runCTest(cuffd_test_poison, .shmemPrivate) }
    func testPoison_hugetlb() throws { try runCTest(cuffd_test_poison, .hugetlb) }
}
