import CUffd
import Foundation
import SystemPackage
import XCTest
@testable import UffdKit

/// Issue 9, bugs 2-4 and ZeroSource: a failed move never blocks its granule, zero-fill on
/// hugetlb, CONTINUE on private shmem.
final class PolicyFixesTests: XCTestCase {
    let ps = basePageSize

    /// Bug 2 without fork: a MOVE fails (its donor page is a hole: ENOENT) under the `.wake`
    /// fallback. The failure must undo the granule's "moving" mark, so the re-fault moves it
    /// (the failure callback has populated the donor page meanwhile) instead of being woken
    /// forever (before the fix: endless re-faults until the watchdog).
    func testFailedMoveUnderWakeFallbackIsRetriedNotWokenForever() throws {
        try require([.move])
        let pages = 8, len = pages * ps, hole = 3
        let r = try MappedRegion(.anonymous(), length: len)
        let donor = try MappedRegion.donor(length: len)
        for p in 0..<pages where p != hole {
            fillPattern(donor.pointer + p * ps, ps, seed: 71, from: p * ps)
        }
        let policy = try MovePolicy(region: r, donor: donor)
        var o = FaultHandler.Options()
        o.fallback = .wake
        let donorPage = UInt(bitPattern: donor.pointer + hole * ps), ps = self.ps
        // Runs on the reader before it reads the next fault: the retried move finds the page.
        o.onFailure = { _ in fillPattern(UnsafeMutableRawPointer(bitPattern: donorPage)!, ps, seed: 71, from: hole * ps) }
        let s = try Session(r, features: [.move], options: o) { _ in policy }
        let base = r.address
        XCTAssertTrue(s.run(20) { _ = touch(base, length: len, threads: 1) }, "the faulting thread was woken forever")
        let st = s.finish()
        verifyPattern(r.pointer, len, seed: 71)
        let f = s.handler.failures()
        XCTAssertEqual(f.count, 1, "\(f)")
        XCTAssertEqual(f.first?.resolution.operation, .move)
        XCTAssertEqual(policy.movedGranules, pages)
        // The failed attempt counts as a move resolution too; its fault got the fallback (a wake).
        XCTAssertEqual(st.resolutions[.move], UInt64(pages + 1), "\(st)")
        XCTAssertEqual(st.fallbacks, 1, "\(st)")
    }

    /// The failure hook is told about the move that failed (and only about it).
    func testPolicyLearnsOfTheFailedResolution() throws {
        try require([.move])
        let len = 4 * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let donor = try MappedRegion.donor(length: len) // never populated: every move is ENOENT
        final class Spy: FaultPolicy, @unchecked Sendable {
            let inner: MovePolicy
            let seen = Box<[(UInt, Resolution.Operation, Errno)]>([])
            init(_ m: MovePolicy) { inner = m }
            func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
                try inner.resolve(fault, context: context)
            }
            func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
                seen.update { $0.append((fault.address, resolution.operation, errno)) }
                inner.failed(fault, resolution: resolution, errno: errno, context: context)
            }
        }
        let move = try MovePolicy(region: r, donor: donor)
        let spy = Spy(move)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, features: [.move], options: o) { _ in spy }
        let base = r.address
        XCTAssertTrue(s.run(20) { _ = touch(base, length: len, threads: 1) })
        _ = s.finish()
        XCTAssertEqual(wordSum(r.pointer, len), 0)
        let seen = spy.seen.value
        XCTAssertEqual(seen.map(\.0), (0..<4).map { base + UInt($0 * ps) })
        XCTAssertTrue(seen.allSatisfy { $0.1 == .move && $0.2 == .noSuchFileOrDirectory }, "\(seen)")
        XCTAssertEqual(move.movedGranules, 0, "every failed move was undone")
    }

    /// Bug 3: zero-fill on hugetlb copies zeros (there is no UFFDIO_ZEROPAGE there). Before the
    /// fix every fault failed and got the fallback (SIGBUS by default; zero-fill here so the
    /// test reports the failures instead of dying).
    func testZeroFillPolicyOnHugetlbCopiesZeros() throws {
        try require([.missingHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 8 * huge
        let ok = try withHugePages(len / huge + 1) {
            let r = try MappedRegion(.hugetlb, length: len)
            let policy = ZeroFillPolicy(region: r)
            XCTAssertTrue(policy.copiesZeros)
            var o = FaultHandler.Options()
            o.fallback = .zeroFill
            o.readers = 2
            let s = try Session(r, features: [.missingHugetlbfs], options: o) { _ in policy }
            let base = r.address
            s.run { _ = touch(base, length: len, threads: 4, stride: 64 << 10) }
            let st = s.finish()
            XCTAssertEqual(wordSum(r.pointer, len), 0)
            XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st) \(s.handler.failures().prefix(1))")
            // Threads touching the same huge page fault concurrently: the later ones find it mapped.
            XCTAssertEqual(st.resolutions[.copy], st.missingFaults, "\(st)")
            XCTAssertEqual(st.missingFaults - st.existed, UInt64(len / huge), "\(st)")
            XCTAssertNil(st.resolutions[.zeropage], "\(st)")
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 1) huge pages (vm.nr_hugepages)") }
    }

    /// Bug 4: CONTINUE on private shmem. The page cache is filled through the shared alias;
    /// the private view maps it with CONTINUE; writes to the private view copy the page, so
    /// the alias (the page cache) keeps the pattern.
    func testContinueOnShmemPrivate() throws {
        try require([.minorShmem])
        let pages = 256, len = pages * ps
        let r = try MappedRegion(.shmemPrivate, length: len)
        fillPattern(r.alias!, len, seed: 72)
        let policy = try ContinuePolicy(region: r)
        var o = FaultHandler.Options()
        o.readers = 2
        let s = try Session(r, features: [.minorShmem], modes: .minor, options: o) { _ in policy }
        let base = r.address, ps = self.ps
        s.run {
            _ = touch(base, length: len / 2, threads: 3)                                   // reads
            _ = touch(base + UInt(len / 2), length: len / 2, threads: 3, write: 0xCD)       // writes
        }
        let st = s.finish()
        XCTAssertEqual(st.minorFaults, UInt64(pages), "\(st)")
        XCTAssertEqual(st.resolutions[.continue], UInt64(pages), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
        verifyPattern(r.pointer, len / 2, seed: 72)
        for p in (pages / 2)..<pages {
            let w = (r.pointer + p * ps).assumingMemoryBound(to: UInt64.self)
            let want = PatternSource.word(at: p * ps, seed: 72) & ~0xFF | 0xCD
            if w[0] != want || w[1] != PatternSource.word(at: p * ps + 8, seed: 72) { XCTFail("private page \(p)"); break }
        }
        verifyPattern(r.alias!, len, seed: 72) // the page cache never saw the private writes
    }

    /// ZeroSource: the shared zeros for counts up to a huge page, zeroed scratch beyond.
    func testZeroSource() throws {
        let z = ZeroSource(length: 1 << 30)
        XCTAssertGreaterThanOrEqual(z.zerosLength, 2 << 20)
        let p = try z.bytes(at: 12345, count: z.zerosLength, scratch: nil)
        XCTAssertEqual(p, z.zeros)
        XCTAssertEqual(wordSum(p, z.zerosLength), 0)
        XCTAssertThrowsError(try z.bytes(at: 0, count: z.zerosLength + ps, scratch: nil))
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: z.zerosLength + ps, alignment: ps)
        defer { scratch.deallocate() }
        memset(scratch, 0xEE, z.zerosLength + ps)
        let q = try z.bytes(at: 0, count: z.zerosLength + ps, scratch: scratch)
        XCTAssertEqual(q, UnsafeRawPointer(scratch))
        XCTAssertEqual(wordSum(q, z.zerosLength + ps), 0)
        // A COPY from it: a region served by CopyPolicy(ZeroSource) reads zeros.
        let len = 16 * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let s = try Session(r) { _ in CopyPolicy(region: r, source: ZeroSource(length: len)) }
        let base = r.address
        s.run { _ = touch(base, length: len, threads: 2) }
        let st = s.finish()
        XCTAssertEqual(wordSum(r.pointer, len), 0)
        XCTAssertEqual(st.resolutions[.copy], UInt64(len / ps), "\(st)")
    }
}
