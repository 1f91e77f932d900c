import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

/// UFFDIO_MOVE with donors that are not exclusive to the process (EBUSY), and moves racing
/// fork(). Decided: a MOVE refused with EBUSY is a failure reported with errno EBUSY and the
/// fix (a MADV_DONTFORK donor); the faulting thread gets the fallback. With a MADV_DONTFORK
/// donor (`MappedRegion.donor`), forks never make a move fail.
final class MoveTests: XCTestCase {
    let pages = 64

    /// Writes the pattern's first word into each donor page (populating it).
    func fillDonor(_ d: MappedRegion, _ n: Int) {
        for p in 0..<n { (d.pointer + p * basePageSize).storeBytes(of: patternWord(p), as: UInt64.self) }
    }

    func testMoveFromDonorSharedWithAChildIsEBUSYAndGetsTheFallback() throws {
        try isolated {
            try requireFeatures([.move])
            let ps = basePageSize, len = pages * ps
            let r = try MappedRegion(.anonymous(), length: len)
            let donor = try MappedRegion(.anonymous(), length: len) // not MADV_DONTFORK
            fillDonor(donor, pages)
            let child = rel_fork_sleeper()
            XCTAssertGreaterThan(child, 0)
            defer { _ = rel_kill_reap(child) }
            let policy = try MovePolicy(region: r, donor: donor)
            let (_, h) = try startHandler(r, features: [.move], options: options(.zeroFill)) { _ in policy }
            let got = readPages(r.address, Array(0..<pages), pageSize: ps, threads: 2)
            h.stop()
            assertPages(got, Array(0..<pages)) { _ in .value(0) }
            let f = h.failures()
            XCTAssertEqual(f.count, pages)
            XCTAssertTrue(f.allSatisfy { $0.errno == .resourceBusy && $0.recoveredByFallback }, "\(f.prefix(2))")
            let e = UffdError(.move, .resourceBusy)
            XCTAssertTrue(e.explanation.contains("MADV_DONTFORK"), e.explanation)
            report("ebusy failures=\(f.count) first=\(f.first.map { "\($0)" } ?? "-")")
        }
    }

    /// Forks (children that stay alive) while threads fault pages that are moved in.
    func movesRacingForks(donor: MappedRegion, r: MappedRegion) throws -> (got: [Int: Access]?, handler: FaultHandler, policy: MovePolicy) {
        let ps = basePageSize
        fillDonor(donor, pages)
        let policy = try MovePolicy(region: r, donor: donor)
        let slow = ClosurePolicy(inner: policy) { f, ctx in
            usleep(300)
            return try policy.resolve(f, context: ctx)
        }
        let (_, h) = try startHandler(r, features: [.move], options: options(.zeroFill, readers: 2)) { _ in slow }
        let done = DispatchSemaphore(value: 0)
        let results = Locked<[Int: Access]?>(nil)
        let n = pages
        spawn {
            let got = readPages(r.address, Array(0..<n), pageSize: ps, threads: 4, timeout: 20)
            results.withLock { $0 = got }
            done.signal()
        }
        var children: [pid_t] = []
        var finished = false
        while !finished && children.count < 40 {
            let c = rel_fork_sleeper()
            if c > 0 { children.append(c) }
            finished = waitFor(done, 0.002)
        }
        if !finished { _ = waitFor(done, 25) }
        for c in children { _ = rel_kill_reap(c) }
        h.stop()
        report("forks=\(children.count)")
        return (results.withLock { $0 }, h, policy)
    }

    func testMovesRacingForkWithDontforkDonorAllSucceed() throws {
        try isolated {
            try requireFeatures([.move])
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let donor = try MappedRegion.donor(length: pages * basePageSize)
            let (got, h, policy) = try movesRacingForks(donor: donor, r: r)
            assertPages(got, Array(0..<pages)) { .value(patternWord($0)) }
            XCTAssertEqual(h.failures().count, 0, "\(h.failures().prefix(2))")
            XCTAssertEqual(policy.movedGranules, pages)
        }
    }

    func testMovesRacingForkWithSharedDonorMoveOrReportEBUSY() throws {
        try isolated {
            try requireFeatures([.move])
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let donor = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let (got, h, _) = try movesRacingForks(donor: donor, r: r)
            // Each page: moved before a fork shared the donor (the pattern) or EBUSY → zero page.
            assertPages(got, Array(0..<pages)) { p in got?[p] == .value(0) ? .value(0) : .value(patternWord(p)) }
            let f = h.failures()
            let zeros = got?.values.filter { $0 == .value(0) }.count ?? -1
            XCTAssertEqual(f.count, zeros, "every zero page is a reported EBUSY")
            XCTAssertTrue(f.allSatisfy { $0.errno == .resourceBusy }, "\(f.prefix(2))")
            report("shared donor racing fork: moved=\(pages - zeros) ebusy=\(f.count)")
        }
    }

    /// Issue 9, bug 2: with `.serveWithSamePolicy` the child's handler used to share the
    /// parent's MovePolicy. A move in the child (no donor there: MADV_DONTFORK) failed and left
    /// the granule "moving", so the parent's later fault on it was woken forever; and a granule
    /// the parent moved after the fork was "moved" for the child too, which was then woken
    /// forever. Decided: the child's faults on the range get the child handler's fallback
    /// (zeros here), and never change the parent's granules.
    func testForkedChildNeverBlocksAGranuleForTheParentOrItself() throws {
        try isolated {
            try requireFeatures([.move, .eventFork])
            let ps = basePageSize, n = 8, len = n * ps
            let r = try MappedRegion(.anonymous(), length: len)
            let donor = try MappedRegion.donor(length: len)
            fillDonor(donor, n)
            let policy = try MovePolicy(region: r, donor: donor)
            var o = options(.zeroFill)
            o.forkHandling = .serveWithSamePolicy
            let (_, h) = try startHandler(r, features: [.move, .eventFork], options: o) { _ in policy }
            defer { h.stop() }
            var fds: [Int32] = [-1, -1]
            XCTAssertEqual(pipe(&fds), 0)
            let base = r.address
            let pid = fork()
            if pid == 0 {
                // Child: wait until the parent moved page 5, then touch page 2 (never moved)
                // and page 5 (moved in the parent only). Exit 0 when both read zeros.
                var b: UInt8 = 0
                _ = read(fds[0], &b, 1)
                let a = UnsafePointer<UInt64>(bitPattern: base + UInt(2 * ps))!.pointee
                let c = UnsafePointer<UInt64>(bitPattern: base + UInt(5 * ps))!.pointee
                _exit(a == 0 && c == 0 ? 0 : 1)
            }
            XCTAssertGreaterThan(pid, 0)
            close(fds[0])
            let moved = readPages(base, [5], pageSize: ps)
            assertPages(moved, [5]) { .value(patternWord($0)) }
            var one: UInt8 = 1
            _ = write(fds[1], &one, 1)
            close(fds[1])
            var status: Int32 = 0
            var waited = 0
            while waitpid(pid, &status, WNOHANG) == 0 && waited < 10_000 { usleep(1000); waited += 1 }
            if waited >= 10_000 {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                XCTFail("the child was still faulting after 10 s (woken forever)")
            } else {
                XCTAssertEqual(status, 0, "the child did not read zeros from its fallback (status \(status))")
            }
            // The parent's granule 2 is not blocked by the child's failed fault.
            let got = readPages(base, Array(0..<n), pageSize: ps, timeout: 10)
            assertPages(got, Array(0..<n)) { .value(patternWord($0)) }
            XCTAssertEqual(policy.movedGranules, n)
            report("child status=\(status) failures=\(h.failures().count)")
        }
    }
}
