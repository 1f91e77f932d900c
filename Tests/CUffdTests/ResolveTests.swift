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

    /// COPY with DONTWAKE leaves the thread asleep; UFFDIO_WAKE of its page (not another) releases it.
    func testCopyDontwakeThenWake_anon() throws { try runCTest(cuffd_test_copy_dontwake_wake, .anon) }
    func testCopyDontwakeThenWake_shmem() throws { try runCTest(cuffd_test_copy_dontwake_wake, .shmem) }
    func testCopyDontwakeThenWake_shmemPrivate() throws { try runCTest(cuffd_test_copy_dontwake_wake, .shmemPrivate) }
    func testCopyDontwakeThenWake_hugetlb() throws { try runCTest(cuffd_test_copy_dontwake_wake, .hugetlb) }

    /// COPY_MODE_WP (and CONTINUE_MODE_WP on shmem/hugetlb) map the page protected: a write is a WP fault.
    func testResolveWithModeWP_anon() throws { try runCTest(cuffd_test_copy_mode_wp, .anon) }
    func testResolveWithModeWP_shmem() throws { try runCTest(cuffd_test_copy_mode_wp, .shmem) }
    func testResolveWithModeWP_shmemPrivate() throws { try runCTest(cuffd_test_copy_mode_wp, .shmemPrivate) }
    func testResolveWithModeWP_hugetlb() throws { try runCTest(cuffd_test_copy_mode_wp, .hugetlb) }

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

    /// cuffd_resolve_one: RESOLVED, EXISTED (EEXIST), GONE (unregistered), FALLBACK (OP_FAIL, MOVE
    /// source hole) and FAILED (nothing can fill the range), with done and error.
    func testResolveOneOutcomes_anon() throws { try runCTest(cuffd_test_resolve_one_outcomes, .anon) }
    func testResolveOneOutcomes_shmem() throws { try runCTest(cuffd_test_resolve_one_outcomes, .shmem) }
    func testResolveOneOutcomes_hugetlb() throws { try runCTest(cuffd_test_resolve_one_outcomes, .hugetlb) }
}
