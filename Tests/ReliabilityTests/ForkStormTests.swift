import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// Forks in quick succession under EVENT_FORK. glibc's fork() holds the malloc locks while the
/// kernel waits for a reader to read the fork event; a reader that allocates after reading the
/// previous fork event (creating that child's handler) would wait for those locks forever.
/// Decided: the reader only hands the child's fd to the handler's service thread, which does the
/// allocating work while the readers go on reading.
final class ForkStormTests: XCTestCase {
    /// Forks `forks` children back to back (no wait between forks); each reads one page that the
    /// parent never touched (its handler, adopted meanwhile, serves it) and exits with 0 when it
    /// read the right word. A deadlock hangs the parent: the watchdog then kills the isolated
    /// child and fails the test.
    func forkStorm(forks: Int, readers: Int, failures: Bool) throws {
        try requireFeatures([.eventFork])
        // Children read pages 0..<64; with `failures` a parent thread faults on the odd pages
        // of the rest meanwhile (failures the parent's reader sees while forks are pending).
        let ps = basePageSize, pages = 64, parentPages = failures ? 2048 : 0, len = (pages + parentPages) * ps
        let r = try MappedRegion(.anonymous(), length: len)
        var o = options(.zeroFill, readers: readers)
        o.forkHandling = .serveWithSamePolicy
        o.failureLogCapacity = 1 << 16
        // With `failures`, every fault on odd pages fails (reported: allocation on the way).
        let (_, h) = try startHandler(r, features: [.eventFork], options: o) { _ in
            let copy = CopyPolicy(region: r, source: PatternSource(length: len))
            return failures ? FailOddPages(base: r.address, inner: copy) as any FaultPolicy : copy
        }
        let parentBad = Atomic<Int>(0)
        let parentDone = DispatchSemaphore(value: 0)
        if failures {
            let base = r.address
            Thread.detachNewThread {
                for page in stride(from: pages + 1, to: pages + parentPages, by: 2)
                    where UnsafePointer<UInt64>(bitPattern: base + UInt(page * ps))!.pointee != 0 {
                    parentBad.add(1, ordering: .relaxed)
                }
                parentDone.signal()
            }
        }
        var pids: [pid_t] = []
        pids.reserveCapacity(forks)
        for i in 0..<forks {
            let page = i % pages
            let expected: UInt64 = failures && page % 2 == 1 ? 0 : patternWord(page)
            let p = UnsafePointer<UInt64>(bitPattern: r.address + UInt(page * ps))!
            let pid = fork()
            let pattern = patternWord(page)
            if pid == 0 {
                let v = p.pointee
                _exit(v == expected ? 0 : v == pattern ? 4 : v == 0 ? 5 : 3)
            }
            XCTAssertGreaterThan(pid, 0, "fork: \(String(cString: strerror(errno)))")
            if pid > 0 { pids.append(pid) }
        }
        var bad = 0
        for (k, pid) in pids.enumerated() {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            if status != 0 {
                if bad < 5 { report("child \(k) page \(k % pages) status \(String(status, radix: 16))") }
                bad += 1
            }
        }
        if failures { parentDone.wait() }
        h.stop()
        let st = h.stats()
        report("forks=\(forks) readers=\(readers) failures=\(failures) forkEvents=\(st.forkEvents) bad=\(bad) failuresReported=\(h.failures().count)")
        XCTAssertEqual(bad, 0, "children that read a wrong word or died")
        XCTAssertEqual(st.forkEvents, UInt64(forks))
        XCTAssertEqual(parentBad.load(ordering: .relaxed), 0, "parent pages that did not read zeros")
        if failures {
            // A fallback meeting a fork in progress (EAGAIN) keeps its fault: decided again
            // (and failed again) once the fork event is read, reported once when it ends.
            // Before, it failed and woke: the page re-faulted and failed again, many times
            // while forks followed each other (4k-12k reports for 1024 failing pages). Reports
            // beyond what the service keeps up with are dropped and counted (one loop error
            // says how many).
            let pagesReported = h.failures().map { ($0.fault.address - r.address) / UInt(ps) }
            let reported = Set(pagesReported)
            XCTAssertEqual(pagesReported.count, reported.count, "a failing page reported more than once per fault")
            XCTAssertLessThanOrEqual(pagesReported.count, parentPages / 2)
            XCTAssertTrue(h.failures().allSatisfy(\.recoveredByFallback), "a failure the fallback did not resolve")
            XCTAssertFalse(reported.isEmpty, "no failure of the parent was reported")
            XCTAssertTrue(reported.allSatisfy { $0 >= UInt(pages) && $0 % 2 == 1 }, "a report for a page that never failed")
            XCTAssertTrue(h.loopErrors().allSatisfy { $0.errno == .noBufferSpace }, "\(h.loopErrors())")
        }
    }

    func testRapidForksWithOneReaderNeverHang() throws {
        try isolated(timeout: 90) { try forkStorm(forks: 300, readers: 1, failures: false) }
    }

    func testRapidForksWithTwoReadersNeverHang() throws {
        try isolated(timeout: 90) { try forkStorm(forks: 300, readers: 2, failures: false) }
    }

    /// Failure reporting allocates (the log, the callback): it must not run on the reader either.
    func testRapidForksWithFailingFaultsNeverHang() throws {
        try isolated(timeout: 90) { try forkStorm(forks: 300, readers: 1, failures: true) }
    }
}

/// Fails every fault on an odd page (the fallback then zero-fills it).
private struct FailOddPages: FaultPolicy {
    let base: UInt
    let inner: any FaultPolicy
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if (fault.address - base) / UInt(basePageSize) % 2 == 1 { return .fail }
        return try inner.resolve(fault, context: context)
    }
    func handle(event: Event, context: borrowing FaultContext) { inner.handle(event: event, context: context) }
    var scratchBytes: Int { inner.scratchBytes }
    func forkedChild() -> any FaultPolicy { FailOddPages(base: base, inner: inner.forkedChild()) }
}
