import CUffd
import CUffdTestSupport
import Foundation
import XCTest
@testable import UffdKit

/// The served range follows mremap of all or part of the memory, for every policy that keeps
/// one (issue 9, bug 5). Each faulting body runs under a watchdog; the fallback is zero-fill so
/// a policy that loses track of its range fails the assertions (failures, wrong bytes) instead
/// of killing the test process with SIGBUS.
final class RemapTests: XCTestCase {
    let ps = basePageSize

    // MARK: ServedRange itself

    func testServedRangeSplitsOnPartialRemapAndMergesBack() {
        let base: UInt = 0x1000_0000, ps = UInt(self.ps)
        let r = ServedRange(start: base, length: 16 * self.ps)
        XCTAssertEqual(r.offset(of: base + 5 * ps + 7), 5 * self.ps + 7)
        XCTAssertNil(r.offset(of: base + 16 * ps))
        XCTAssertNil(r.offset(of: base - 1))

        // Pages 4..<8 move to `to`: only they.
        let to: UInt = 0x2000_0000
        XCTAssertTrue(r.remap(from: base + 4 * ps, to: to, length: 4 * self.ps))
        XCTAssertEqual(r.segments.count, 3, "\(r)")
        XCTAssertEqual(r.start, base)
        XCTAssertEqual(r.offset(of: base + 3 * ps), 3 * self.ps)
        XCTAssertNil(r.offset(of: base + 4 * ps), "the old address of a moved page is no longer served")
        XCTAssertEqual(r.offset(of: to), 4 * self.ps)
        XCTAssertEqual(r.pageIndex(of: to + 3 * ps + 100), 7)
        XCTAssertEqual(r.offset(of: base + 8 * ps), 8 * self.ps)
        XCTAssertEqual(r.locate(to + ps)?.segmentEnd, to + 4 * ps, "a window must stop at the segment's end")
        XCTAssertEqual(r.address(ofOffset: 6 * self.ps), to + 2 * ps)

        // A remap touching nothing of the range changes nothing.
        XCTAssertFalse(r.remap(from: 0x3000_0000, to: 0x4000_0000, length: self.ps))

        // Moving them back restores one segment.
        XCTAssertTrue(r.remap(from: to, to: base + 4 * ps, length: 4 * self.ps))
        XCTAssertEqual(r.segments, [ServedRange.Segment(start: base, offset: 0, length: 16 * self.ps)])

        // An unmap in the middle removes those bytes only; the copy is independent.
        let child = r.copy()
        XCTAssertTrue(r.unmap(start: base + 2 * ps, end: base + 3 * ps))
        XCTAssertFalse(r.contains(base + 2 * ps))
        XCTAssertTrue(r.contains(base + 3 * ps))
        XCTAssertTrue(child.contains(base + 2 * ps))
        XCTAssertEqual(r.offsets(inAddresses: base, base + 4 * ps), [0..<(2 * self.ps), (3 * self.ps)..<(4 * self.ps)])
        XCTAssertTrue(r.unmap(start: 0, end: UInt.max))
        XCTAssertTrue(r.segments.isEmpty)
        XCTAssertEqual(r.start, 0)
    }

    // MARK: Policies after a partial mremap

    /// Maps `len` anonymous bytes and a PROT_NONE target of `targetLength` to remap into; both
    /// whole ranges are unmapped when the test ends, wherever the remap left the pages.
    func anonAndTarget(_ len: Int, _ targetLength: Int) -> (UInt, UInt) {
        let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let target = mmap(nil, targetLength, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let (oldAddress, targetAddress) = (UInt(bitPattern: raw), UInt(bitPattern: target))
        addTeardownBlock {
            munmap(UnsafeMutableRawPointer(bitPattern: oldAddress), len)
            munmap(UnsafeMutableRawPointer(bitPattern: targetAddress), targetLength)
        }
        return (oldAddress, targetAddress)
    }

    func zeroFillFallback() -> FaultHandler.Options {
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        return o
    }

    /// Runs `policy` on `[old, old+len)` with remap events; `body` faults and remaps.
    func runRemapping(_ old: UInt, _ len: Int, features: Features = [], modes: RegisterMode = .missing,
                      policy: any FaultPolicy, _ body: @escaping @Sendable () -> Void) throws -> HandlerStats {
        let u = try Userfaultfd(features: features.union([.eventRemap, .eventUnmap]))
        try u.register(old, length: len, modes: modes)
        let h = FaultHandler(uffd: u, policy: policy, options: zeroFillFallback())
        try h.start()
        let ok = withWatchdog(60, onTimeout: { u.close(); h.stop() }, body)
        h.stop()
        u.close()
        XCTAssertTrue(ok)
        if !h.failures().isEmpty { XCTFail("first failure: \(h.failures()[0])") }
        return h.stats()
    }

    /// The first 16 pages of 64 move; the rest stays. Issue: the whole start moved with them.
    func testCopyPolicyPartialRemapOfTheStartMovesOnlyThatPart() throws {
        try require([.eventRemap, .eventUnmap])
        let pages = 64, len = pages * ps, moved = 16
        let (old, tgt) = anonAndTarget(len, moved * ps)
        let policy = CopyPolicy(start: old, length: len, source: PatternSource(length: len, seed: 61))
        let ps = self.ps
        let rc = Box<Int32>(-1)
        let st = try runRemapping(old, len, policy: policy) {
            _ = touch(old, length: 4 * ps, threads: 1)
            rc.update { $0 = remapFixed(old, moved * ps, tgt) }
            _ = touch(tgt, length: moved * ps, threads: 2)
            _ = touch(old + UInt(moved * ps), length: len - moved * ps, threads: 2)
        }
        XCTAssertEqual(rc.value, 0)
        verifyPattern(UnsafeRawPointer(bitPattern: tgt)!, moved * ps, seed: 61)
        verifyPattern(UnsafeRawPointer(bitPattern: old + UInt(moved * ps))!, len - moved * ps, seed: 61, offset: moved * ps)
        XCTAssertEqual(st.resolutions[.copy], UInt64(pages), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    /// Pages 16..<32 of 64 move; a readahead window of 8 pages must stop at each segment's end.
    func testZeroFillWithReadaheadPartialRemapOfTheMiddle() throws {
        try require([.eventRemap, .eventUnmap])
        let pages = 64, len = pages * ps, lo = 16, n = 16
        let (old, tgt) = anonAndTarget(len, n * ps)
        let zero = ZeroFillPolicy(start: old, length: len)
        let policy = ReadaheadPolicy(zero, window: .fixed(pages: 8))
        let ps = self.ps
        let rc = Box<Int32>(-1)
        // Something written before the remap so the pages read as non-zero if a window clobbered them.
        let st = try runRemapping(old, len, policy: policy) {
            rc.update { $0 = remapFixed(old + UInt(lo * ps), n * ps, tgt) }
            // Faults at pages 12 (window 12..<16, not past the hole) and 60 (window 60..<64).
            _ = touch(old + UInt(12 * ps), length: ps, threads: 1)
            _ = touch(tgt + UInt(4 * ps), length: ps, threads: 1)
            _ = touch(old, length: lo * ps, threads: 2, write: 1)
            _ = touch(tgt, length: n * ps, threads: 2, write: 2)
            _ = touch(old + UInt((lo + n) * ps), length: len - (lo + n) * ps, threads: 2, write: 3)
        }
        XCTAssertEqual(rc.value, 0)
        XCTAssertEqual(zero.range.segments.count, 3, "\(zero.range)")
        XCTAssertEqual(zero.range.offset(of: tgt), lo * ps)
        for p in 0..<pages {
            let addr = p < lo ? old + UInt(p * ps) : p < lo + n ? tgt + UInt((p - lo) * ps) : old + UInt(p * ps)
            let want: UInt8 = p < lo ? 1 : p < lo + n ? 2 : 3
            let b = UnsafePointer<UInt8>(bitPattern: addr)!
            XCTAssertEqual(b[0], want, "page \(p)")
            XCTAssertEqual(b[8], 0, "page \(p)")
        }
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    /// Granules 8..<24 of 32 move; each granule is moved once, into its new address.
    func testMovePolicyPartialRemapOfTheMiddle() throws {
        try require([.move, .eventRemap, .eventUnmap])
        let pages = 32, len = pages * ps, lo = 8, n = 16
        let (old, tgt) = anonAndTarget(len, n * ps)
        let donor = try MappedRegion.donor(length: len)
        fillPattern(donor.pointer, len, seed: 62)
        let policy = try MovePolicy(start: old, length: len, donor: donor)
        let ps = self.ps
        let rc = Box<Int32>(-1)
        let st = try runRemapping(old, len, features: [.move], policy: policy) {
            _ = touch(old + UInt(lo * ps), length: 2 * ps, threads: 1) // moved before the remap
            rc.update { $0 = remapFixed(old + UInt(lo * ps), n * ps, tgt) }
            _ = touch(tgt, length: n * ps, threads: 2)
            _ = touch(old, length: lo * ps, threads: 2)
            _ = touch(old + UInt((lo + n) * ps), length: len - (lo + n) * ps, threads: 2)
        }
        XCTAssertEqual(rc.value, 0)
        verifyPattern(UnsafeRawPointer(bitPattern: old)!, lo * ps, seed: 62)
        verifyPattern(UnsafeRawPointer(bitPattern: tgt)!, n * ps, seed: 62, offset: lo * ps)
        verifyPattern(UnsafeRawPointer(bitPattern: old + UInt((lo + n) * ps))!, len - (lo + n) * ps, seed: 62, offset: (lo + n) * ps)
        XCTAssertEqual(policy.movedGranules, pages)
        XCTAssertEqual(st.resolutions[.move], UInt64(pages), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    /// The whole region moves; the routes (a copied part, a zero-filled part) follow it.
    func testRouterRoutesFollowAnMremap() throws {
        try require([.eventRemap, .eventUnmap])
        let pages = 32, len = pages * ps, half = len / 2
        let (old, tgt) = anonAndTarget(len, len)
        let copy = CopyPolicy(start: old, length: half, source: PatternSource(length: half, seed: 63))
        let zero = ZeroFillPolicy(start: old + UInt(half), length: half)
        let router = try RouterPolicy([.init(start: old, length: half, policy: copy),
                                       .init(start: old + UInt(half), length: half, policy: zero)])
        let ps = self.ps
        let rc = Box<Int32>(-1)
        let st = try runRemapping(old, len, policy: router) {
            _ = touch(old, length: 2 * ps, threads: 1)
            rc.update { $0 = remapFixed(old, len, tgt) }
            _ = touch(tgt, length: len, threads: 2)
        }
        XCTAssertEqual(rc.value, 0)
        XCTAssertEqual(router.routes[0].range.start, tgt)
        XCTAssertEqual(router.routes[1].range.start, tgt + UInt(half))
        verifyPattern(UnsafeRawPointer(bitPattern: tgt)!, half, seed: 63)
        XCTAssertEqual(wordSum(UnsafeRawPointer(bitPattern: tgt + UInt(half))!, half), 0)
        XCTAssertEqual(st.resolutions[.copy], UInt64(pages / 2), "\(st)")
        XCTAssertEqual(st.resolutions[.zeropage], UInt64(pages / 2), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    /// A shmem view is remapped in part; the hook sees each page's logical offset in the
    /// page cache (the alias), wherever the registered view now is.
    func testContinuePolicyAfterPartialMremap() throws {
        try require([.minorShmem, .eventRemap, .eventUnmap])
        let pages = 32, len = pages * ps, lo = 8, n = 8
        let r = try MappedRegion(.shmem, length: len)
        fillPattern(r.alias!, len, seed: 64)
        let tgtRaw = mmap(nil, n * ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let tgt = UInt(bitPattern: tgtRaw)
        defer { munmap(tgtRaw, n * ps) }
        let policy = try ContinuePolicy(region: r) { page, offset, _ in
            page.storeBytes(of: UInt64(offset) | 0x8000_0000_0000_0000, as: UInt64.self)
        }
        let old = r.address, ps = self.ps
        let rc = Box<Int32>(-1)
        let st = try runRemapping(old, len, features: [.minorShmem], modes: .minor, policy: policy) {
            _ = touch(old, length: 2 * ps, threads: 1)
            rc.update { $0 = remapFixed(old + UInt(lo * ps), n * ps, tgt) }
            _ = touch(tgt, length: n * ps, threads: 2)
            _ = touch(old, length: lo * ps, threads: 2)
            _ = touch(old + UInt((lo + n) * ps), length: len - (lo + n) * ps, threads: 2)
        }
        XCTAssertEqual(rc.value, 0)
        for p in 0..<pages {
            let addr = p >= lo && p < lo + n ? tgt + UInt((p - lo) * ps) : old + UInt(p * ps)
            let w = UnsafePointer<UInt64>(bitPattern: addr)!
            XCTAssertEqual(w[0], UInt64(p * ps) | 0x8000_0000_0000_0000, "page \(p): hook saw the wrong offset")
            XCTAssertEqual(w[1], PatternSource.word(at: p * ps + 8, seed: 64), "page \(p)")
        }
        XCTAssertEqual(st.resolutions[.continue], UInt64(pages), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    /// A tracked region is remapped in part; writes at the new address are logged as the
    /// range's pages and copied into the snapshot at their logical place.
    func testWriteTrackerAfterPartialMremap() throws {
        try require([.pagefaultFlagWP, .eventRemap, .eventUnmap])
        let pages = 32, len = pages * ps, lo = 8, n = 8
        let (old, tgt) = anonAndTarget(len, n * ps)
        fillPattern(UnsafeMutableRawPointer(bitPattern: old)!, len, seed: 65)
        let snap = UnsafeMutableRawPointer.allocate(byteCount: len, alignment: ps)
        defer { snap.deallocate() }
        memset(snap, 0, len)
        let tracker = WriteTrackerPolicy(start: old, length: len, snapshot: snap)
        let u = try Userfaultfd(features: [.pagefaultFlagWP, .eventRemap, .eventUnmap])
        try u.register(old, length: len, modes: .writeProtect)
        try tracker.arm(u)
        let h = FaultHandler(uffd: u, policy: tracker, options: zeroFillFallback())
        try h.start()
        let ps = self.ps
        let rc = Box<Int32>(-1)
        let written = [1, lo, lo + 3, lo + n - 1, lo + n, pages - 1]
        let ok = withWatchdog(60, onTimeout: { u.close(); h.stop() }) {
            rc.update { $0 = remapFixed(old + UInt(lo * ps), n * ps, tgt) }
            for p in written {
                let addr = p >= lo && p < lo + n ? tgt + UInt((p - lo) * ps) : old + UInt(p * ps)
                UnsafeMutablePointer<UInt8>(bitPattern: addr + 16)!.pointee = 0xAB
            }
        }
        h.stop()
        u.close()
        XCTAssertTrue(ok)
        XCTAssertEqual(rc.value, 0)
        XCTAssertEqual(tracker.dirtyPages(), written)
        for p in written {
            let w = (snap + p * ps).assumingMemoryBound(to: UInt64.self)
            XCTAssertEqual(w[2], PatternSource.word(at: p * ps + 16, seed: 65), "snapshot page \(p)")
        }
        XCTAssertTrue(h.failures().isEmpty, "\(h.failures().prefix(2))")
        XCTAssertEqual(h.stats().fallbacks, 0)
    }

    /// AsyncWriteTracker keeps its range in the same type. Its fd asks for no REMAP events (no
    /// handler would read them), so the kernel unregisters memory that mremap moves: the owner
    /// drops that part from the range, and the tracker goes on scanning the rest.
    func testAsyncWriteTrackerDropsTheRemappedPart() throws {
        try require([.wpAsync, .wpUnpopulated])
        let pages = 32, len = pages * ps, lo = 8, n = 8
        let (old, tgt) = anonAndTarget(len, n * ps)
        memset(UnsafeMutableRawPointer(bitPattern: old)!, 1, len)
        let t = try AsyncWriteTracker(start: old, length: len)
        XCTAssertEqual(try t.collectPageCount(), 0)
        XCTAssertEqual(remapFixed(old + UInt(lo * ps), n * ps, tgt), 0)
        XCTAssertTrue(t.range.unmap(start: old + UInt(lo * ps), end: old + UInt((lo + n) * ps)))
        XCTAssertEqual(t.range.segments.count, 2)
        UnsafeMutablePointer<UInt8>(bitPattern: old)!.pointee = 2
        UnsafeMutablePointer<UInt8>(bitPattern: tgt + UInt(2 * ps))!.pointee = 2 // no longer tracked
        UnsafeMutablePointer<UInt8>(bitPattern: old + UInt((pages - 1) * ps))!.pointee = 2
        let ranges = try t.collect()
        XCTAssertEqual(ranges.map(\.lowerBound), [old, old + UInt((pages - 1) * ps)], "\(ranges)")
        XCTAssertEqual(try t.collectPageCount(), 0, "re-protected by the scan")
    }
}

/// mremap(2) of `[from, from+len)` to exactly `to`; 0 or -errno.
func remapFixed(_ from: UInt, _ len: Int, _ to: UInt) -> Int32 {
    cuffd_mremap_fixed(UnsafeMutableRawPointer(bitPattern: from), UInt64(len), UnsafeMutableRawPointer(bitPattern: to))
}
