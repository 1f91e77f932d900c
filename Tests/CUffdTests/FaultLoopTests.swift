import CUffdTestSupport
import XCTest

/// cuffd_loop_run: batches from several faulting threads, stats, fallback, stop, EAGAIN retry.
final class FaultLoopTests: HugetlbReservingTestCase {
    /// Four threads fault; a C decider answers in batches of up to 8; every counter is exact.
    func testLoopResolvesThreadsInBatches_anon() throws { try runCTest(cuffd_test_loop_threads, .anon) }
    func testLoopResolvesThreadsInBatches_shmem() throws { try runCTest(cuffd_test_loop_threads, .shmem) }
    func testLoopResolvesThreadsInBatches_shmemPrivate() throws { try runCTest(cuffd_test_loop_threads, .shmemPrivate) }
    func testLoopResolvesThreadsInBatches_hugetlb() throws { try runCTest(cuffd_test_loop_threads, .hugetlb) }

    /// OP_FAIL with the POISON fallback: the faulting thread is released with SIGBUS.
    func testLoopFallbackPoison_anon() throws { try runCTest(cuffd_test_loop_fallback_poison, .anon) }
    func testLoopFallbackPoison_shmem() throws { try runCTest(cuffd_test_loop_fallback_poison, .shmem) }
    func testLoopFallbackPoison_shmemPrivate() throws { try runCTest(cuffd_test_loop_fallback_poison, .shmemPrivate) }
    func testLoopFallbackPoison_hugetlb() throws { try runCTest(cuffd_test_loop_fallback_poison, .hugetlb) }

    /// OP_FAIL with the ZEROPAGE fallback: the faulting thread is released and reads zeros.
    func testLoopFallbackZeropage_anon() throws { try runCTest(cuffd_test_loop_fallback_zeropage, .anon) }
    func testLoopFallbackZeropage_shmem() throws { try runCTest(cuffd_test_loop_fallback_zeropage, .shmem) }
    func testLoopFallbackZeropage_shmemPrivate() throws { try runCTest(cuffd_test_loop_fallback_zeropage, .shmemPrivate) }
    func testLoopFallbackZeropage_hugetlb() throws { try runCTest(cuffd_test_loop_fallback_zeropage, .hugetlb) }

    /// Faults queued before the stop are drained and resolved (stop_drained counts them).
    func testLoopStopDrainsQueuedFaults_anon() throws { try runCTest(cuffd_test_loop_stop_drains, .anon) }

    /// A REMOVE queued behind a fault: the COPY gets EAGAIN, the loop reads the event and retries.
    func testLoopEAGAINRetryKeepsFault_anon() throws { try runCTest(cuffd_test_loop_eagain_retry, .anon) }
}
