import CUffdTestSupport
import XCTest

/// Non-cooperative events and EAGAIN while one is unread.
final class EventTests: HugetlbReservingTestCase {
    /// EVENT_FORK: the child's uffd arrives in the message; the child's faults arrive on it.
    func testEventFork_anon() throws { try runCTest(cuffd_test_event_fork, .anon) }
    func testEventFork_shmem() throws { try runCTest(cuffd_test_event_fork, .shmem) }
    func testEventFork_shmemPrivate() throws { try runCTest(cuffd_test_event_fork, .shmemPrivate) }
    func testEventFork_hugetlb() throws { try runCTest(cuffd_test_event_fork, .hugetlb) }

    /// EVENT_REMAP: mremap reports from/to/len and the data moves along.
    func testEventRemap_anon() throws { try runCTest(cuffd_test_event_remap, .anon) }
    func testEventRemap_shmem() throws { try runCTest(cuffd_test_event_remap, .shmem) }
    func testEventRemap_shmemPrivate() throws { try runCTest(cuffd_test_event_remap, .shmemPrivate) }
    func testEventRemap_hugetlb() throws { try runCTest(cuffd_test_event_remap, .hugetlb) }

    /// EVENT_REMOVE: MADV_DONTNEED reports start/end and blocks until the event is read.
    func testEventRemove_anon() throws { try runCTest(cuffd_test_event_remove, .anon) }
    func testEventRemove_shmem() throws { try runCTest(cuffd_test_event_remove, .shmem) }
    func testEventRemove_shmemPrivate() throws { try runCTest(cuffd_test_event_remove, .shmemPrivate) }
    func testEventRemove_hugetlb() throws { try runCTest(cuffd_test_event_remove, .hugetlb) }

    /// EVENT_UNMAP: munmap reports start/end.
    func testEventUnmap_anon() throws { try runCTest(cuffd_test_event_unmap, .anon) }
    func testEventUnmap_shmem() throws { try runCTest(cuffd_test_event_unmap, .shmem) }
    func testEventUnmap_shmemPrivate() throws { try runCTest(cuffd_test_event_unmap, .shmemPrivate) }
    func testEventUnmap_hugetlb() throws { try runCTest(cuffd_test_event_unmap, .hugetlb) }

    /// While a REMOVE is unread, COPY/ZEROPAGE/MOVE/CONTINUE/POISON/WRITEPROTECT give EAGAIN with
    /// nothing done; after it is read, the retry succeeds.
    func testEveryResolveEAGAINWhileRemoveUnread_anon() throws { try runCTest(cuffd_test_eagain_while_remove_unread, .anon) }
    func testEveryResolveEAGAINWhileRemoveUnread_shmem() throws { try runCTest(cuffd_test_eagain_while_remove_unread, .shmem) }
    func testEveryResolveEAGAINWhileRemoveUnread_shmemPrivate() throws { try runCTest(cuffd_test_eagain_while_remove_unread, .shmemPrivate) }
    func testEveryResolveEAGAINWhileRemoveUnread_hugetlb() throws { try runCTest(cuffd_test_eagain_while_remove_unread, .hugetlb) }
}

/// How faults are delivered: SIGBUS mode, THREAD_ID, EXACT_ADDRESS.
final class FaultDeliveryTests: HugetlbReservingTestCase {
    /// UFFD_FEATURE_SIGBUS: a missing page raises SIGBUS (caught in the isolated test process), no message.
    func testSigbusMode_anon() throws { try runCTest(cuffd_test_sigbus_mode, .anon) }
    func testSigbusMode_shmem() throws { try runCTest(cuffd_test_sigbus_mode, .shmem) }
    func testSigbusMode_shmemPrivate() throws { try runCTest(cuffd_test_sigbus_mode, .shmemPrivate) }
    func testSigbusMode_hugetlb() throws { try runCTest(cuffd_test_sigbus_mode, .hugetlb) }

    /// THREAD_ID: ptid is the faulting thread's tid; EXACT_ADDRESS: the address is not masked.
    func testThreadIdAndExactAddress_anon() throws { try runCTest(cuffd_test_thread_id_exact_address, .anon) }
    func testThreadIdAndExactAddress_shmem() throws { try runCTest(cuffd_test_thread_id_exact_address, .shmem) }
    func testThreadIdAndExactAddress_shmemPrivate() throws { try runCTest(cuffd_test_thread_id_exact_address, .shmemPrivate) }
    func testThreadIdAndExactAddress_hugetlb() throws { try runCTest(cuffd_test_thread_id_exact_address, .hugetlb) }

    /// Without those features the address is masked to the page and ptid is 0.
    func testDefaultAddressMasked_anon() throws { try runCTest(cuffd_test_address_masked, .anon) }
    func testDefaultAddressMasked_hugetlb() throws { try runCTest(cuffd_test_address_masked, .hugetlb) }
}
