import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// Fork (with and without EVENT_FORK), handler stop with blocked threads, the fd closed,
/// the faulting process killed.
final class LifecycleTests: XCTestCase {
    let pages = 32

    /// Sum of the first byte of each page of a PatternSource image, for pages in `populated`.
    func firstByteSum(_ populated: Range<Int>) -> UInt64 {
        populated.reduce(0) { $0 + (patternWord($1) & 0xFF) }
    }

    /// Parent touches the first half; a forked child reads the first byte of every page.
    func forkChildSum(features: Features, forkHandling: FaultHandler.ForkHandling) throws -> (UInt64, FaultHandler) {
        let ps = basePageSize, len = pages * ps
        let r = try MappedRegion(.anonymous(), length: len)
        var o = options(.poison)
        o.forkHandling = forkHandling
        let (_, h) = try startHandler(r, features: features, options: o) { _ in
            CopyPolicy(region: r, source: PatternSource(length: len))
        }
        let half = readPages(r.address, Array(0..<(pages / 2)), pageSize: ps)
        assertPages(half, Array(0..<(pages / 2))) { .value(patternWord($0)) }
        let before = h.stats().missingFaults
        var sum: UInt64 = 0
        let rc = cuffd_fork_and_sum(r.pointer, UInt64(len), UInt64(ps), 10_000, &sum)
        XCTAssertEqual(rc, 0, "the child did not finish: \(String(cString: strerror(-rc)))")
        report("fork features=\(features) handling=\(forkHandling) childFaultsServed=\(h.stats().missingFaults - before)")
        h.stop()
        return (sum, h)
    }

    /// Decided: without EVENT_FORK the child's copy of the memory is not registered: it sees
    /// the pages the parent had populated and zeros elsewhere, and never blocks.
    func testForkWithoutEventForkChildSeesZerosForMissingPages() throws {
        try isolated {
            let (sum, h) = try forkChildSum(features: [], forkHandling: .serveWithSamePolicy)
            XCTAssertEqual(sum, firstByteSum(0..<(pages / 2)))
            XCTAssertEqual(h.stats().missingFaults, UInt64(pages / 2), "the child's accesses reached the handler")
        }
    }

    /// Decided: with EVENT_FORK and `.serveWithSamePolicy`, a handler with the same policy
    /// serves the child: it sees the whole image.
    func testForkWithEventForkChildIsServedBySamePolicy() throws {
        try isolated {
            try requireFeatures([.eventFork])
            let (sum, h) = try forkChildSum(features: [.eventFork], forkHandling: .serveWithSamePolicy)
            XCTAssertEqual(sum, firstByteSum(0..<pages))
            let st = h.stats()
            XCTAssertEqual(st.forkEvents, 1)
            XCTAssertEqual(st.missingFaults, UInt64(pages), "parent's half + child's half: \(st)")
        }
    }

    /// Decided: with EVENT_FORK and `.release`, the child's fd is closed: its faults resolve
    /// as for unregistered memory (zeros), and it does not block.
    func testForkWithEventForkReleasedChildSeesZeros() throws {
        try isolated {
            try requireFeatures([.eventFork])
            let (sum, h) = try forkChildSum(features: [.eventFork], forkHandling: .release)
            XCTAssertEqual(sum, firstByteSum(0..<(pages / 2)))
            XCTAssertEqual(h.stats().forkEvents, 1)
        }
    }

    /// Decided: `stop()` resolves every fault already queued (through the policy) before it
    /// returns; a fault that arrives after the stop waits until a handler runs again (restart)
    /// or the fd is closed (the access then proceeds as on unregistered memory: zeros).
    func testStopWithManyBlockedThreadsDrainsThemAndLaterFaultsWaitForRestartOrClose() throws {
        try isolated {
            let ps = basePageSize, len = pages * ps
            let r = try MappedRegion(.anonymous(), length: len)
            let copy = CopyPolicy(region: r, source: PatternSource(length: len))
            let slow = ClosurePolicy(inner: copy) { f, ctx in
                usleep(20_000)
                return try copy.resolve(f, context: ctx)
            }
            let (uffd, h) = try startHandler(r, options: options(.poison, readers: 1, batch: 1)) { _ in slow }
            // 12 threads block on 12 pages; the handler needs 240 ms for them.
            let blocked = 12
            let done = DispatchSemaphore(value: 0)
            let results = Locked<[Int: Access]?>(nil)
            spawn {
                let got = readPages(r.address, Array(0..<blocked), pageSize: ps, threads: blocked, timeout: 10)
                results.withLock { $0 = got }
                done.signal()
            }
            usleep(60_000)
            h.stop()
            XCTAssertTrue(waitFor(done, 1), "stop() returned with threads still blocked")
            let got = results.withLock { $0 }
            assertPages(got, Array(0..<blocked)) { .value(patternWord($0)) }
            let drained = h.stats().stopDrained
            XCTAssertGreaterThan(drained, 0, "nothing was queued at the stop: the test did not race")

            // After the stop: a new fault waits...
            let later = DispatchSemaphore(value: 0)
            let laterValue = Locked<[Int: Access]?>(nil)
            spawn {
                let g = readPages(r.address, [20], pageSize: ps, timeout: 10)
                laterValue.withLock { $0 = g }
                later.signal()
            }
            XCTAssertFalse(waitFor(later, 0.3), "a fault after stop() was resolved without a handler")
            // ...until the handler runs again.
            try h.start()
            XCTAssertTrue(waitFor(later, 5), "restarting the handler did not resolve the waiting fault")
            assertPages(laterValue.withLock { $0 }, [20]) { .value(patternWord($0)) }
            h.stop()
            // Stats count across runs: the first run's faults and the one served after restart.
            XCTAssertGreaterThanOrEqual(h.stats().missingFaults, UInt64(blocked + 1), "\(h.stats())")

            // Or until the fd is closed: the access then proceeds without userfaultfd.
            let closed = DispatchSemaphore(value: 0)
            let closedValue = Locked<[Int: Access]?>(nil)
            spawn {
                let g = readPages(r.address, [21], pageSize: ps, timeout: 10)
                closedValue.withLock { $0 = g }
                closed.signal()
            }
            XCTAssertFalse(waitFor(closed, 0.3))
            uffd.close()
            XCTAssertTrue(waitFor(closed, 5), "closing the fd did not release the waiting fault")
            assertPages(closedValue.withLock { $0 }, [21]) { _ in .value(0) }
            report("stop stopDrained=\(drained)")
        }
    }

    /// Decided: closing the fd with no handler running wakes every blocked thread; their
    /// accesses proceed as on unregistered memory (anonymous: zeros).
    func testCloseWithoutHandlerReleasesBlockedThreads() throws {
        try isolated {
            let ps = basePageSize
            let r = try MappedRegion(.anonymous(), length: pages * ps)
            let uffd = try Userfaultfd()
            try uffd.register(r, modes: .missing)
            let done = DispatchSemaphore(value: 0)
            let results = Locked<[Int: Access]?>(nil)
            let n = pages
            spawn {
                let got = readPages(r.address, Array(0..<n), pageSize: ps, threads: 8, timeout: 10)
                results.withLock { $0 = got }
                done.signal()
            }
            XCTAssertFalse(waitFor(done, 0.2))
            uffd.close()
            XCTAssertTrue(waitFor(done, 5))
            assertPages(results.withLock { $0 }, Array(0..<pages)) { _ in .value(0) }
        }
    }

    /// Decided: closing the fd while a handler runs does not pull it from under the readers:
    /// the handler holds its own descriptor of the file, keeps serving (the blocked threads are
    /// resolved by the policy) and reports no loop error; `stop()` then drops the last
    /// reference. (Without that descriptor the readers would read a closed — or reused — fd
    /// number, and blocked threads would wait for the readers' poll() to end.)
    func testCloseWhileHandlerRunsKeepsServingUntilStop() throws {
        try isolated {
            let ps = basePageSize, len = pages * ps
            let r = try MappedRegion(.anonymous(), length: len)
            let gate = Atomic<Bool>(false)
            let copy = CopyPolicy(region: r, source: PatternSource(length: len))
            let policy = ClosurePolicy(inner: copy) { f, ctx in
                // Hold the first faults until the fd is closed.
                while !gate.load(ordering: .relaxed) { usleep(1000) }
                return try copy.resolve(f, context: ctx)
            }
            let (uffd, h) = try startHandler(r, options: options(.poison, readers: 2, batch: 4)) { _ in policy }
            let done = DispatchSemaphore(value: 0)
            let results = Locked<[Int: Access]?>(nil)
            let n = pages
            spawn {
                let got = readPages(r.address, Array(0..<n), pageSize: ps, threads: 8, timeout: 20)
                results.withLock { $0 = got }
                done.signal()
            }
            usleep(50_000)
            uffd.close()
            gate.store(true, ordering: .relaxed)
            XCTAssertTrue(waitFor(done, 10), "threads still blocked after the fd was closed under a running handler")
            let stopped = DispatchSemaphore(value: 0)
            spawn { h.stop(); stopped.signal() }
            XCTAssertTrue(waitFor(stopped, 10), "stop() hung after the fd was closed")
            assertPages(results.withLock { $0 }, Array(0..<pages)) { .value(patternWord($0)) }
            XCTAssertEqual(h.loopErrors().count, 0, "\(h.loopErrors())")
            XCTAssertEqual(h.stats().missingFaults, UInt64(pages))
        }
    }

    /// Decided: when the faulting process dies with faults queued, the handler answers them
    /// (COPY into a dead mm: ESRCH/ENOENT → `gone`, or no message at all once the mm is
    /// torn down), keeps serving its other memory, and stops cleanly.
    func testFaultingProcessKilledWhileBlocked() throws {
        try isolated {
            try requireFeatures([.eventFork])
            let ps = basePageSize, len = pages * ps
            let r = try MappedRegion(.anonymous(), length: len)
            let copy = CopyPolicy(region: r, source: PatternSource(length: len))
            let slowMode = Atomic<Bool>(true)
            let policy = ClosurePolicy(inner: copy) { f, ctx in
                if slowMode.load(ordering: .relaxed) { usleep(50_000) }
                return try copy.resolve(f, context: ctx)
            }
            let (_, h) = try startHandler(r, features: [.eventFork], options: options(.poison)) { _ in policy }
            // The child needs 32 x 50 ms; it is killed after 200 ms, blocked on a fault.
            var sum: UInt64 = 0
            let rc = cuffd_fork_and_sum(r.pointer, UInt64(len), UInt64(ps), 200, &sum)
            XCTAssertEqual(rc, -ETIMEDOUT, "the child was not blocked")
            usleep(100_000)
            slowMode.store(false, ordering: .relaxed)
            // The parent's memory is still served.
            let got = readPages(r.address, Array(0..<pages), pageSize: ps, threads: 2)
            assertPages(got, Array(0..<pages)) { .value(patternWord($0)) }
            let stopped = DispatchSemaphore(value: 0)
            spawn { h.stop(); stopped.signal() }
            XCTAssertTrue(waitFor(stopped, 10), "stop() hung after the child died")
            let st = h.stats()
            XCTAssertEqual(st.failures, 0, "\(h.failures().prefix(3))")
            report("killed gone=\(st.gone) forkEvents=\(st.forkEvents) faults=\(st.missingFaults) loopErrors=\(h.loopErrors().count)")
        }
    }
}
