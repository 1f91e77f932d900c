import CUffdTestSupport
import XCTest

/// In-thread resolution (UFFD_FEATURE_SIGBUS, `cuffd_sigbus_*`): the faulting thread resolves its
/// own fault in a SIGBUS handler. Each case runs in a forked child with a watchdog.
final class InThreadTests: HugetlbReservingTestCase {
    /// 4 threads race on the same pages, 4 more fault their own: every page is copied exactly
    /// once (the racers see EEXIST), every byte matches the source, no failure.
    func testManyThreadsSameAndDifferentPages_anon() throws { try runCTest(cuffd_test_sigbus_threads, .anon) }
    /// The same on shmem (MISSING_SHMEM).
    func testManyThreadsSameAndDifferentPages_shmem() throws { try runCTest(cuffd_test_sigbus_threads, .shmem) }
    /// The same on hugetlb: one 2 MiB COPY per fault.
    func testManyThreadsSameAndDifferentPages_hugetlb() throws { try runCTest(cuffd_test_sigbus_threads, .hugetlb) }
    /// A truncated file mapping's SIGBUS and a kill(SIGBUS) reach the handler
    /// installed before ours, with their own si_code and address.
    func testSignalNotOursReachesPreviousHandler() throws { try runCTest(cuffd_test_sigbus_not_ours) }
    /// With the default action before us, a signal that is not ours and a failed resolution
    /// (fallback .signal) kill the process with SIGBUS, as without us.
    func testDefaultActionBeforeUsKillsWithSIGBUS() throws { try runCTest(cuffd_test_sigbus_default_action) }
    /// A thread with a 16 KiB alternate signal stack resolves its fault on that stack.
    func testFaultOnAlternateSignalStack() throws { try runCTest(cuffd_test_sigbus_altstack) }
    /// The policy's source is itself an unresolved page of a SIGBUS-mode range: COPY fails with
    /// EFAULT (no nested signal); fallback zero-fills, or the signal is delivered once.
    func testNestedFaultInPolicySourceFailsCleanly() throws { try runCTest(cuffd_test_sigbus_nested_source) }
    /// A policy whose answer never maps the page: the signal is delivered after a few attempts,
    /// never an endless SIGBUS loop; a page mapped, dropped and faulted again 20 times is not a loop.
    func testResolutionThatDoesNotStickIsDeliveredNotLooped() throws { try runCTest(cuffd_test_sigbus_loop_guard) }
    /// Zeropage, file (pread; tail past EOF zero), move (donor emptied; dropped page -> zeros),
    /// continue (MINOR shmem), poison (every access delivered, the page never filled over).
    func testBuiltInPolicies() throws { try runCTest(cuffd_test_sigbus_policies) }
    /// A syscall writing into an unresolved page gets EFAULT (no signal in kernel mode);
    /// after cuffd_sigbus_prefault it succeeds.
    func testKernelModeAccessIsEFAULTUntilPrefaulted() throws { try runCTest(cuffd_test_sigbus_kernel_access) }
    /// Unregister, remove and uninstall while 4 threads fault: nobody dies or hangs, every page
    /// holds the source or zeros; restore puts the previous action back.
    func testUninstallWithFaultsInFlight() throws { try runCTest(cuffd_test_sigbus_uninstall_in_flight, timeout: 60) }
    /// fork: the child sees resolved pages and zeros elsewhere, starts with an empty table and
    /// can serve its own ranges; the parent goes on resolving.
    func testFork() throws { try runCTest(cuffd_test_sigbus_fork) }
    /// A handler installed over ours that chains to it keeps our ranges resolving and foreign
    /// signals reaching the action before ours; ours installed on top again cuts the cycle.
    func testHandlerInstalledOverOursThatChains() throws { try runCTest(cuffd_test_sigbus_chained_from_above) }
    /// The range unregistered under the fault (ENOENT) is "gone": no fallback, no signal; the
    /// access is retried on what is now ordinary memory.
    func testRangeGoneUnderTheFaultIsRetried() throws { try runCTest(cuffd_test_sigbus_gone) }
}
