import CUffd
import CUffdTestSupport
import XCTest

/// In-thread resolution (UFFD_FEATURE_SIGBUS, `cuffd_sigbus_*`): the faulting thread resolves its
/// own fault in a SIGBUS handler. The rows of the C table's "sigbus" group (ct_sigbus.c), one
/// XCTest per behaviour; each case runs in a forked child with a watchdog.
final class InThreadTests: HugetlbReservingTestCase {
    /// Runs row `sigbus_<name>` on `kind` the way runCGroup runs a case: PASS returns, SKIP
    /// throws XCTSkip with the reason, FAIL records the case's message.
    private func run(_ name: String, _ kind: cuffd_mem_kind = CUFFD_MEM_ANON, timeout: Int32 = 30,
                     file: StaticString = #filePath, line: UInt = #line) throws {
        guard let c = cCases(group: "sigbus")?.first(where: {
            String(cString: $0.row.pointee.name) == "sigbus_" + name && $0.memKind == Int32(kind.rawValue)
        }) else {
            return XCTFail("the C table has no row sigbus_\(name) on memory \(kind.rawValue)", file: file, line: line)
        }
        let (rc, message) = runCCase(c, timeout: timeout)
        switch rc {
        case Int32(CUFFD_TEST_PASS.rawValue): return
        case Int32(CUFFD_TEST_SKIP.rawValue): throw XCTSkip(message, file: file, line: line)
        default: XCTFail("\(c.label): \(message.isEmpty ? "failed without a message" : message)", file: file, line: line)
        }
    }

    /// 4 threads race on the same pages, 4 more fault their own: every page is copied exactly
    /// once (the racers see EEXIST), every byte matches the source, no failure.
    func testManyThreadsSameAndDifferentPages_anon() throws { try run("threads", CUFFD_MEM_ANON) }
    /// The same on shmem (MISSING_SHMEM).
    func testManyThreadsSameAndDifferentPages_shmem() throws { try run("threads", CUFFD_MEM_SHMEM) }
    /// The same on hugetlb: one 2 MiB COPY per fault.
    func testManyThreadsSameAndDifferentPages_hugetlb() throws { try run("threads", CUFFD_MEM_HUGETLB) }
    /// A truncated file mapping's SIGBUS and a kill(SIGBUS) reach the handler installed before
    /// ours, with their own si_code and address.
    func testSignalNotOursReachesPreviousHandler() throws { try run("not_ours") }
    /// With the default action before us, a signal that is not ours and a failed resolution
    /// (fallback .signal) kill the process with SIGBUS, as without us.
    func testDefaultActionBeforeUsKillsWithSIGBUS() throws { try run("default_action") }
    /// A thread with a 16 KiB alternate signal stack resolves its fault on that stack.
    func testFaultOnAlternateSignalStack() throws { try run("altstack") }
    /// The policy's source is itself an unresolved page of a SIGBUS-mode range: COPY fails with
    /// EFAULT (no nested signal); fallback zero-fills, or the signal is delivered once.
    func testNestedFaultInPolicySourceFailsCleanly() throws { try run("nested_source") }
    /// A policy whose answer never maps the page: the signal is delivered after a few attempts,
    /// never an endless SIGBUS loop; a page mapped, dropped and faulted again 20 times is not a loop.
    func testResolutionThatDoesNotStickIsDeliveredNotLooped() throws { try run("loop_guard") }
    /// Zeropage, file (pread; tail past EOF zero), move (donor emptied; dropped page -> zeros),
    /// continue (MINOR shmem), poison (every access delivered, the page never filled over).
    func testBuiltInPolicies() throws { try run("policies") }
    /// A syscall writing into an unresolved page gets EFAULT (no signal in kernel mode);
    /// after cuffd_sigbus_prefault it succeeds.
    func testKernelModeAccessIsEFAULTUntilPrefaulted() throws { try run("kernel_access") }
    /// Unregister, remove and uninstall while 4 threads fault: nobody dies or hangs, every page
    /// holds the source or zeros; restore puts the previous action back.
    func testUninstallWithFaultsInFlight() throws { try run("uninstall_in_flight", timeout: 60) }
    /// fork: the child sees resolved pages and zeros elsewhere, starts with an empty table and
    /// can serve its own ranges; the parent goes on resolving.
    func testFork() throws { try run("fork") }
    /// The fault-service latency histogram: bucket arithmetic within 12.5%; 64 faults give 64
    /// samples with 0 < min <= p50 <= p90 <= p99 <= max; a source sleeping 2 ms per page gives
    /// min and p50 >= 2 ms; a range without CUFFD_SIGBUS_LATENCY records nothing.
    func testLatencyHistogram() throws { try run("latency") }
    /// A handler installed over ours that chains to it keeps our ranges resolving and foreign
    /// signals reaching the action before ours; ours installed on top again cuts the cycle.
    func testHandlerInstalledOverOursThatChains() throws { try run("chained_from_above") }
    /// The range unregistered under the fault (ENOENT) is "gone": no fallback, no signal; the
    /// access is retried on what is now ordinary memory.
    func testRangeGoneUnderTheFaultIsRetried() throws { try run("gone") }

    /// Every row of the group has its XCTest above (a new row needs one).
    func testEveryRowRuns() {
        let rows = Set((cCases(group: "sigbus") ?? []).map { String(cString: $0.row.pointee.name) })
        let covered: Set<String> = ["threads", "not_ours", "default_action", "altstack", "nested_source", "loop_guard",
                                    "policies", "kernel_access", "uninstall_in_flight", "fork", "chained_from_above", "gone",
                                    "latency"]
        XCTAssertEqual(rows, Set(covered.map { "sigbus_" + $0 }))
    }
}
