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

    /// EAGAIN after partial progress (a COPY whose source faults while a REMOVE is queued): the
    /// retry continues at start+done and the first attempt's bytes are counted.
    func testLoopEAGAINAfterPartialProgressContinues_anon() throws { try runCTest(cuffd_test_loop_eagain_partial, .anon) }

    /// OP_DEFER: two faults on a range in flight wait for one fetch finished from another
    /// thread; a fetch past its deadline gets the fallback (ETIMEDOUT to `complete`); late and
    /// second finishes are refused; cancel wakes what is in flight and refuses new claims.
    func testDeferredResolution_anon() throws { try runCTest(cuffd_test_deferred_loop, .anon) }
    func testDeferredResolution_shmem() throws { try runCTest(cuffd_test_deferred_loop, .shmem) }

    /// Two threads fault on one page: one COPY resolves, the other gets EEXIST, is woken and counted.
    func testLoopEEXISTWakesSecondFaulter_anon() throws { try runCTest(cuffd_test_loop_eexist_wakes, .anon) }

    /// Stopping under a never-ending fault stream returns, and no fault it read is lost.
    func testLoopStopUnderLoadLosesNoFault_anon() throws { try runCTest(cuffd_test_loop_stop_under_load, .anon) }

    /// Two loops on one uffd: every fault is read and resolved by exactly one of them.
    func testTwoLoopsShareOneUffd_anon() throws { try runCTest(cuffd_test_loop_two_loops, .anon) }
    func testTwoLoopsShareOneUffd_shmem() throws { try runCTest(cuffd_test_loop_two_loops, .shmem) }

    /// spin_polls > 0 (busy-poll before poll()): same results, and stop still works.
    func testLoopBusyPoll_anon() throws { try runCTest(cuffd_test_loop_busy_poll, .anon) }

    /// MINOR faults through the loop with CONTINUE; an OP_FAIL falls back to CONTINUE.
    func testLoopMinorContinue_shmem() throws { try runCTest(cuffd_test_loop_minor, .shmem) }
    func testLoopMinorContinue_shmemPrivate() throws { try runCTest(cuffd_test_loop_minor, .shmemPrivate) }
    func testLoopMinorContinue_hugetlb() throws { try runCTest(cuffd_test_loop_minor, .hugetlb) }

    /// WP faults through the loop with UNPROTECT; an OP_FAIL on a WP fault only unprotects.
    func testLoopWriteProtect_anon() throws { try runCTest(cuffd_test_loop_wp, .anon) }
    func testLoopWriteProtect_shmem() throws { try runCTest(cuffd_test_loop_wp, .shmem) }
    func testLoopWriteProtect_shmemPrivate() throws { try runCTest(cuffd_test_loop_wp, .shmemPrivate) }
    func testLoopWriteProtect_hugetlb() throws { try runCTest(cuffd_test_loop_wp, .hugetlb) }

    /// A decider that sets DONTWAKE in mode does not leave the faulting thread asleep (the loop manages waking).
    func testLoopDecidersDontwakeIsManaged_anon() throws { try runCTest(cuffd_test_loop_dontwake_managed, .anon) }

    /// A resolution that misses the faulting page (EEXIST elsewhere) wakes the thread; its re-fault is asked again.
    func testLoopMisdirectedResolutionWakesThread_anon() throws { try runCTest(cuffd_test_loop_misdirected, .anon) }

    /// A fault after the loop stopped stays queued; closing the uffd releases it (it faults normally).
    func testFaultAfterStopReleasedByClose_anon() throws { try runCTest(cuffd_test_loop_close_releases, .anon) }
    func testFaultAfterStopReleasedByClose_shmem() throws { try runCTest(cuffd_test_loop_close_releases, .shmem) }
    func testFaultAfterStopReleasedByClose_hugetlb() throws { try runCTest(cuffd_test_loop_close_releases, .hugetlb) }
    func testLoopWithoutHandshakeIsEINVAL() throws { try runCTest(cuffd_test_loop_without_handshake, .anon) }
}
