import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// MOVE from a donor pool and CONTINUE for minor faults, end to end with contents verified.
final class MoveContinueTests: XCTestCase {
    let size = 64 * MiB

    func testMoveFromDonorBasePages() throws {
        try require([.move])
        let r = try MappedRegion(.anonymous(), length: size)
        let donor = try MappedRegion.donor(length: size)
        fillPattern(donor.pointer, size, seed: 10)
        let policy = try MovePolicy(region: r, donor: donor)
        var o = FaultHandler.Options()
        o.readers = 2
        let s = try Session(r, features: [.move], options: o) { _ in policy }
        let base = r.address, size = self.size
        s.run { _ = touch(base, length: size, threads: 4) }
        let st = s.finish()
        verifyPattern(r.pointer, size, seed: 10)
        XCTAssertEqual(policy.movedGranules, size / basePageSize)
        XCTAssertEqual(st.resolutions[.move], UInt64(size / basePageSize) , "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    func testMoveTwoMiBGranules() throws {
        try require([.move])
        let huge = 2 * MiB
        let r = try MappedRegion(.anonymous(thpAligned: true), length: size)
        let donor = try MappedRegion.donor(length: size, alignment: huge, hugePages: true)
        fillPattern(donor.pointer, size, seed: 11)
        let policy = try MovePolicy(region: r, donor: donor, granule: huge)
        let s = try Session(r, features: [.move]) { _ in policy }
        let base = r.address, size = self.size
        s.run { _ = touch(base, length: size, threads: 4) }
        let st = s.finish()
        verifyPattern(r.pointer, size, seed: 11)
        XCTAssertEqual(policy.movedGranules, size / huge)
        // One fault per granule; concurrent faults on a granule being moved are woken.
        XCTAssertEqual(st.resolutions[.move], UInt64(size / huge), "\(st)")
        XCTAssertEqual(st.bytes, UInt64(size) + UInt64(st.resolutions[.wake] ?? 0) * UInt64(basePageSize), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    func testMoveRefusesMisalignedDonor() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
        let d = try MappedRegion.donor(length: 2 * basePageSize)
        XCTAssertThrowsError(try MovePolicy(region: r, donor: d))
    }

    func testContinueShmemWithHookEditingThePageCache() throws {
        try require([.minorShmem])
        let r = try MappedRegion(.shmem, length: size)
        // Fill the page cache through the alias (no faults: the alias is not registered).
        fillPattern(r.alias!, size, seed: 12)
        let policy = try ContinuePolicy(region: r) { page, offset, _ in
            // Stamp the page's offset into its first word before it is mapped.
            page.storeBytes(of: UInt64(offset) | 0x8000_0000_0000_0000, as: UInt64.self)
        }
        var o = FaultHandler.Options()
        o.readers = 2
        let s = try Session(r, features: [.minorShmem], modes: .minor, options: o) { _ in policy }
        let base = r.address, size = self.size
        s.run { _ = touch(base, length: size, threads: 4, stride: basePageSize) }
        let st = s.finish()
        XCTAssertEqual(st.minorFaults, UInt64(size / basePageSize), "\(st)")
        XCTAssertEqual(st.resolutions[.continue], UInt64(size / basePageSize))
        let w = r.pointer.assumingMemoryBound(to: UInt64.self)
        for page in 0..<(size / basePageSize) {
            let first = page * basePageSize / 8
            XCTAssertEqual(w[first], UInt64(page * basePageSize) | 0x8000_0000_0000_0000)
            if w[first + 1] != PatternSource.word(at: page * basePageSize + 8, seed: 12) {
                XCTFail("page \(page) differs"); break
            }
        }
    }

    func testContinueHugetlb() throws {
        try require([.minorHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 32 * huge
        var ran = false
        let ok = try withHugePages(len / huge + 2) {
            ran = true
            let r = try MappedRegion(.hugetlb, length: len)
            fillPattern(r.alias!, len, seed: 13)
            let policy = try ContinuePolicy(region: r)
            let s = try Session(r, features: [.minorHugetlbfs], modes: .minor) { _ in policy }
            let base = r.address
            s.run { _ = touch(base, length: len, threads: 4) }
            let st = s.finish()
            verifyPattern(r.pointer, len, seed: 13)
            // Threads touching the same huge page fault concurrently: the later ones find it mapped.
            XCTAssertEqual(st.minorFaults - st.existed, UInt64(len / huge), "\(st)")
            XCTAssertEqual(st.bytes, UInt64(len))
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 2) huge pages (vm.nr_hugepages)") }
        XCTAssertTrue(ran)
    }

    func testCopyHugetlbMissing() throws {
        try require([.missingHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 32 * huge
        let ok = try withHugePages(len / huge + 2) {
            let r = try MappedRegion(.hugetlb, length: len)
            let src = PatternSource(length: len, seed: 14)
            let s = try Session(r, features: [.missingHugetlbfs]) { _ in CopyPolicy(region: r, source: src) }
            let base = r.address
            s.run { _ = touch(base, length: len, threads: 4) }
            let st = s.finish()
            verifyPattern(r.pointer, len, seed: 14)
            XCTAssertEqual(st.missingFaults - st.existed, UInt64(len / huge), "\(st)")
            XCTAssertEqual(st.bytes, UInt64(len))
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 2) huge pages (vm.nr_hugepages)") }
    }

    func testContinueRequiresAnAlias() throws {
        let r = try MappedRegion(.anonymous(), length: basePageSize)
        XCTAssertThrowsError(try ContinuePolicy(region: r))
    }
}
