import CUffdTestSupport
import XCTest

/// UFFDIO_REGISTER modes and range ioctl masks per memory type, UNREGISTER, and ownership.
final class RegisterTests: HugetlbReservingTestCase {
    func testRegisterModes_anon() throws { try runCTest(cuffd_test_register_modes, .anon) }
    func testRegisterModes_shmem() throws { try runCTest(cuffd_test_register_modes, .shmem) }
    func testRegisterModes_shmemPrivate() throws { try runCTest(cuffd_test_register_modes, .shmemPrivate) }
    func testRegisterModes_hugetlb() throws { try runCTest(cuffd_test_register_modes, .hugetlb) }

    func testRegisterOwnedRangeBusy_anon() throws { try runCTest(cuffd_test_register_busy, .anon) }
    func testRegisterOwnedRangeBusy_shmem() throws { try runCTest(cuffd_test_register_busy, .shmem) }
    func testRegisterOwnedRangeBusy_shmemPrivate() throws { try runCTest(cuffd_test_register_busy, .shmemPrivate) }
    func testRegisterOwnedRangeBusy_hugetlb() throws { try runCTest(cuffd_test_register_busy, .hugetlb) }
}
