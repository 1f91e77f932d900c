import CUffd
import CUffdTestSupport
import Foundation
import XCTest
@testable import UffdKit

/// Huge-page coverage (issue 14): `HugePageCoverage`/`ProcessPagemap` on this process and on a
/// child, and `HandlerStats.hugePageCoverage` of a handler that installs by COPY (4 KiB pages:
/// 0), by MOVE of huge donor windows (all huge) and into hugetlb (all huge). Faulting code runs
/// under the `Session` watchdog.
final class HugePageCoverageTests: XCTestCase {
    /// Handler options measuring `r` in this process at each stats().
    func measuring(_ r: MappedRegion, fallback: FaultHandler.Fallback = .poison) throws -> FaultHandler.Options {
        var o = FaultHandler.Options()
        o.fallback = fallback
        o.hugePageCoverage = try HugePageCoverage.Target(ranges: [ServedRange(region: r)])
        return o
    }

    func testCopyInstallsSmallPagesSoCoverageIsZero() throws {
        let len = 8 * MiB
        let r = try MappedRegion(.anonymous(thpAligned: true), length: len)
        try r.advise(MADV_HUGEPAGE)
        let src = PatternSource(length: len, seed: 41)
        let s = try Session(r, options: try measuring(r)) { _ in CopyPolicy(region: r, source: src) }
        XCTAssertEqual(s.handler.stats().hugePageCoverage, HugePageCoverage(hugePageBytes: 0, bytes: len))
        let base = r.address
        s.run { _ = touch(base, length: len, threads: 1) }
        let running = s.handler.stats()
        let st = s.finish()
        verifyPattern(r.pointer, len, seed: 41)
        XCTAssertEqual(st.missingFaults, UInt64(len / basePageSize), "\(st)")
        // UFFDIO_COPY maps 4 KiB pages even where THP could back the range.
        XCTAssertEqual(running.hugePageCoverage, HugePageCoverage(hugePageBytes: 0, bytes: len))
        XCTAssertNotNil(running.hugePageCoverageMeasuredNs)
        // Without the option, stats() measures nothing.
        let plain = FaultHandler(uffd: s.uffd, policy: CopyPolicy(region: r, source: src))
        XCTAssertNil(plain.stats().hugePageCoverage)
    }

    func testMoveOfHugeDonorWindowsIsAllHuge() throws {
        let len = 8 * MiB
        let path = NSTemporaryDirectory() + "uffdkit-hugecov-\(getpid()).img"
        let image = UnsafeMutableRawPointer.allocate(byteCount: len, alignment: basePageSize)
        defer { image.deallocate(); unlink(path) }
        fillPattern(image, len, seed: 42)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes: image, count: len)))
        let r = try MappedRegion(.anonymous(thpAligned: true), length: len)
        try r.advise(MADV_HUGEPAGE)
        if !WindowInstaller.thpEligible(r.address) { throw XCTSkip("THP cannot back anonymous memory here (THP off)") }
        let src = try FileSource(path: path)
        var made: InstallPolicy?
        let s = try Session(r, options: try measuring(r, fallback: .zeroFill)) { u in
            let p = InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 0)
            made = p
            return p
        }
        let base = r.address
        s.run { _ = touch(base, length: len, threads: 1) }
        let running = s.handler.stats()
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, image, len), 0, "the region differs from the file")
        XCTAssertEqual(made?.stats.moved, 4, "every 2 MiB window moved: \(String(describing: made?.stats)) \(st)")
        XCTAssertEqual(running.hugePageCoverage, HugePageCoverage(hugePageBytes: len, bytes: len))
        // The handler is stopped, the memory still mapped: stats() still measures it.
        XCTAssertEqual(st.hugePageCoverage?.hugePageBytes, len)
        XCTAssertEqual(try HugePageCoverage.measure(start: r.address, length: len).fraction, 1.0)
    }

    func testHugetlbServedByCopyIsAllHugeAndHolesDoNotCount() throws {
        try require([.missingHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 4 * huge
        let ok = try withHugePages(len / huge + 2) {
            let r = try MappedRegion(.hugetlb, length: len)
            let src = PatternSource(length: len, seed: 43)
            let s = try Session(r, features: [.missingHugetlbfs], options: try measuring(r)) { _ in CopyPolicy(region: r, source: src) }
            // Untouched hugetlb entries report PAGE_IS_HUGE without a page: they must not count.
            XCTAssertEqual(s.handler.stats().hugePageCoverage, HugePageCoverage(hugePageBytes: 0, bytes: len))
            let base = r.address
            s.run { _ = touch(base, length: huge, threads: 1) }
            XCTAssertEqual(s.handler.stats().hugePageCoverage, HugePageCoverage(hugePageBytes: huge, bytes: len))
            s.run { _ = touch(base, length: len, threads: 2) }
            let st = s.finish()
            verifyPattern(r.pointer, len, seed: 43)
            XCTAssertEqual(st.hugePageCoverage, HugePageCoverage(hugePageBytes: len, bytes: len), "\(st)")
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 2) huge pages (vm.nr_hugepages)") }
    }

    /// Another process measured through /proc/PID/pagemap; once it is gone, ESRCH, and a
    /// handler measuring it keeps reporting the last value with its time.
    func testChildProcessMeasuredByPidThenGone() throws {
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 4 * huge
        var result = false
        let ok = try withHugePages(len / huge + 2) {
            var addr: UInt64 = 0
            let pid = cuffd_fork_memory_child(UInt64(len), 1, UInt64(2 * huge), &addr)
            guard pid > 0 else { return XCTFail("child set-up failed: \(pid)") }
            var reaped = false
            defer { if !reaped { _ = cuffd_kill_child(pid) } }
            let start = UInt(addr)
            XCTAssertEqual(try HugePageCoverage.measure(pid: pid, start: start, length: len),
                           HugePageCoverage(hugePageBytes: 2 * huge, bytes: len))
            // Not this process's memory: here the same addresses are not the child's mapping.
            XCTAssertEqual(try HugePageCoverage.measure(start: start, length: len).hugePageBytes, 0)
            let pm = try ProcessPagemap(pid: pid)
            XCTAssertEqual(try pm.measure(start: start, length: huge).hugePageBytes, huge)

            // A handler of some memory of ours, measuring the child's (serve's arrangement).
            let mine = try MappedRegion(.anonymous(), length: basePageSize)
            let uffd = try Userfaultfd()
            var o = FaultHandler.Options()
            o.hugePageCoverage = HugePageCoverage.Target(pagemap: pm, ranges: [ServedRange(start: start, length: len, pageSize: huge)])
            let h = FaultHandler(uffd: uffd, policy: CopyPolicy(region: mine, source: PatternSource(length: basePageSize, seed: 1)), options: o)
            let alive = h.stats()
            XCTAssertEqual(alive.hugePageCoverage?.hugePageBytes, 2 * huge)
            let measuredAt = try XCTUnwrap(alive.hugePageCoverageMeasuredNs)

            XCTAssertEqual(cuffd_kill_child(pid), 0)
            reaped = true
            assertGone(try pm.measure(start: start, length: len))
            assertGone(try HugePageCoverage.measure(pid: pid, start: start, length: len))
            assertGone(try ProcessPagemap(pid: pid))
            let gone = h.stats()
            XCTAssertEqual(gone.hugePageCoverage, HugePageCoverage(hugePageBytes: 2 * huge, bytes: len), "the last value measured")
            XCTAssertEqual(gone.hugePageCoverageMeasuredNs, measuredAt, "and when it was measured")
            result = true
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 2) huge pages (vm.nr_hugepages)") }
        XCTAssertTrue(result)
    }

    /// `body` throws the "process gone" error (ESRCH, with the explanation saying so).
    func assertGone<T>(_ body: @autoclosure () throws -> T, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), "measuring a gone process must throw", file: file, line: line) { e in
            guard let error = e as? UffdError else { return XCTFail("\(e)", file: file, line: line) }
            XCTAssertEqual(error.errno, .noSuchProcess, "\(error)", file: file, line: line)
            XCTAssertEqual(error.operation, .pagemapScan, file: file, line: line)
            XCTAssertTrue(error.description.contains("gone"), error.description, file: file, line: line)
        }
    }

    func testCoverageSumsAndFraction() {
        let a = HugePageCoverage(hugePageBytes: 2 * MiB, bytes: 8 * MiB)
        let b = HugePageCoverage(hugePageBytes: 0, bytes: 8 * MiB)
        XCTAssertEqual((a + b).fraction, 0.125)
        XCTAssertEqual(HugePageCoverage(hugePageBytes: 0, bytes: 0).fraction, 0)
        var s = HandlerStats()
        var child = HandlerStats()
        child.hugePageCoverage = a
        child.hugePageCoverageMeasuredNs = 5
        s.add(child)
        s.add(child)
        XCTAssertEqual(s.hugePageCoverage, a + a)
        XCTAssertTrue(s.description.contains("huge_page_bytes=\(4 * MiB)/\(16 * MiB)"), s.description)
    }
}

/// What one coverage measurement costs (PAGEMAP_SCAN walks the page tables of the range): 1 GiB
/// of populated 4 KiB pages, of THP, and never touched. Not a timed test: it prints ns per scan
/// and asserts only the counts; it runs when asked (`UFFDKIT_MEASURE=1`).
final class HugePageCoverageMeasurement: XCTestCase {
    func testScanCostPerGiB() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] != nil else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 to measure")
        }
        let len = 1 << 30
        func best(_ r: MappedRegion) throws -> (UInt64, Int) {
            var t = UInt64.max, huge = 0
            let pm = try ProcessPagemap()
            for _ in 0..<5 {
                let t0 = cuffd_now_ns()
                huge = try pm.measure(start: r.address, length: len).hugePageBytes
                t = min(t, cuffd_now_ns() - t0)
            }
            return (t, huge)
        }
        let small = try MappedRegion(.anonymous(thpAligned: true), length: len)
        try small.advise(MADV_NOHUGEPAGE)
        let untouched = try best(small)
        try small.advise(MADV_POPULATE_WRITE)
        let pages4k = try best(small)
        XCTAssertEqual(pages4k.1, 0)
        let thp = try MappedRegion(.anonymous(thpAligned: true), length: len)
        try thp.advise(MADV_HUGEPAGE)
        try thp.advise(MADV_POPULATE_WRITE)
        let huge = try best(thp)
        print("huge-page coverage scan of 1 GiB (best of 5): untouched \(untouched.0 / 1000) us, "
              + "4 KiB pages \(pages4k.0 / 1000) us, THP \(huge.0 / 1000) us (\(huge.1 >> 20) MiB huge)")
    }
}
