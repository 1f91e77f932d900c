import CUffd
import CUffdTestSupport
import Foundation
import XCTest
@testable import UffdKit

/// Write tracking (sync WP faults, snapshot, WP_ASYNC), poison and routing, end to end.
final class TrackingTests: XCTestCase {
    let size = 64 * MiB

    func testWriteTrackerLogsDirtyPages() throws {
        try require([.pagefaultFlagWP])
        let r = try MappedRegion(.anonymous(), length: size)
        memset(r.pointer, 1, size)
        let tracker = WriteTrackerPolicy(region: r)
        var o = FaultHandler.Options()
        o.readers = 2
        let s = try Session(r, features: [.pagefaultFlagWP], modes: .writeProtect, options: o) { u in
            try tracker.arm(u)
            return tracker
        }
        let base = r.address, size = self.size
        // Every 3rd page is written, by 4 threads.
        s.run { _ = touch(base, length: size, threads: 4, stride: 3 * basePageSize, write: 9) }
        let st = s.finish()
        let expected = Array(stride(from: 0, to: size / basePageSize, by: 3))
        let dirty = tracker.dirtyPages()
        XCTAssertTrue(dirty == expected, "dirty \(dirty.count) pages, expected \(expected.count)")
        XCTAssertEqual(st.writeProtectFaults, UInt64(expected.count), "\(st)")
        XCTAssertEqual(st.resolutions[.unprotect], UInt64(expected.count))
        XCTAssertEqual((r.pointer + 3 * basePageSize).load(as: UInt8.self), 9)
        XCTAssertEqual((r.pointer + basePageSize).load(as: UInt8.self), 1)
    }

    func testWriteTrackerSnapshotCopiesBeforeWrite() throws {
        try require([.pagefaultFlagWP])
        let r = try MappedRegion(.anonymous(), length: size)
        fillPattern(r.pointer, size, seed: 20)
        let snap = try MappedRegion(.anonymous(), length: size)
        let tracker = WriteTrackerPolicy(region: r, snapshot: snap.pointer)
        let s = try Session(r, features: [.pagefaultFlagWP], modes: .writeProtect) { u in
            try tracker.arm(u)
            return tracker
        }
        let base = r.address, size = self.size
        s.run { _ = touch(base, length: size, threads: 4, stride: 2 * basePageSize, write: 0xFF) }
        _ = s.finish()
        let dirty = tracker.dirtyPages()
        XCTAssertEqual(dirty.count, size / basePageSize / 2)
        for p in dirty {
            // The snapshot holds the page as it was when armed; memory has the write.
            let off = p * basePageSize
            verifyPattern(snap.pointer + off, basePageSize, seed: 20, offset: off)
            XCTAssertEqual((r.pointer + off).load(as: UInt8.self), 0xFF)
        }
        XCTAssertFalse(tracker.isDirty(page: 1))
    }

    func testAsyncWriteTrackerWithPagemapScan() throws {
        try require([.wpAsync, .wpUnpopulated])
        let r = try MappedRegion(.anonymous(), length: size)
        memset(r.pointer, 1, size)
        let t = try AsyncWriteTracker(region: r)
        XCTAssertEqual(try t.collectPageCount(), 0)
        // No handler: the kernel resolves the write faults itself.
        let base = r.address, size = self.size
        let done = withWatchdog(60, onTimeout: { t.uffd.close() }) {
            _ = touch(base, length: size, threads: 4, stride: 5 * basePageSize, write: 3)
        }
        XCTAssertTrue(done)
        let expected = (size / basePageSize + 4) / 5
        XCTAssertEqual(try t.collectPageCount(reprotect: true), expected)
        XCTAssertEqual(try t.collectPageCount(reprotect: true), 0, "re-protected by the scan")
        for i in 0..<7 { (r.pointer + i * 11 * basePageSize).storeBytes(of: 4, as: UInt8.self) }
        let ranges = try t.collect()
        XCTAssertEqual(ranges.count, 7)
        XCTAssertEqual(ranges.first, r.address..<(r.address + UInt(basePageSize)))
    }

    func testPoisonSelectedPages() throws {
        try require([.poison])
        let r = try MappedRegion(.anonymous(), length: size)
        let pages = size / basePageSize
        let poisoned = Set(stride(from: 7, to: pages, by: 1000).map { r.address + UInt($0 * basePageSize) })
        let policy = PoisonPolicy(pages: poisoned, otherwise: ZeroFillPolicy(region: r))
        let s = try Session(r, features: [.poison]) { _ in policy }
        let base = r.address
        let sigbus = Box<Int>(0)
        let sum = Box<UInt64>(0)
        s.run {
            DispatchQueue.concurrentPerform(iterations: 4) { t in
                var bus = 0, total: UInt64 = 0
                for p in stride(from: t, to: pages, by: 4) {
                    var v: UInt8 = 0
                    let addr = UnsafePointer<UInt8>(bitPattern: base + UInt(p * basePageSize))!
                    if cuffd_read_catching_sigbus(addr, &v) == 1 { bus += 1 } else { total &+= UInt64(v) }
                }
                let b = bus, tt = total
                sigbus.update { $0 += b }
                sum.update { $0 &+= tt }
            }
        }
        let st = s.finish()
        XCTAssertEqual(sigbus.value, poisoned.count)
        XCTAssertEqual(sum.value, 0)
        XCTAssertEqual(st.resolutions[.poison], UInt64(poisoned.count), "\(st)")
        XCTAssertEqual(st.resolutions[.zeropage], UInt64(pages - poisoned.count))
    }

    func testRouterSendsSubRangesToTheirPolicies() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let q = size / 4
        let a = r.address, b = a + UInt(q), c = b + UInt(q)
        let router = try RouterPolicy([
            .init(start: a, length: q, policy: CopyPolicy(start: a, length: q, source: PatternSource(length: q, seed: 30))),
            .init(start: c, length: 2 * q, policy: ReadaheadPolicy(
                CopyPolicy(start: c, length: 2 * q, source: PatternSource(length: 2 * q, seed: 31)),
                window: .fixed(pages: 8))),
        ], otherwise: ZeroFillPolicy(region: r))
        XCTAssertEqual(router.scratchBytes, 8 * basePageSize)
        let s = try Session(r) { _ in router }
        let base = r.address, size = self.size
        s.run { _ = touch(base, length: size, threads: 4) }
        let st = s.finish()
        verifyPattern(r.pointer, q, seed: 30)
        XCTAssertEqual(wordSum(r.pointer + q, q), 0)
        verifyPattern(r.pointer + 2 * q, 2 * q, seed: 31)
        XCTAssertEqual(st.resolutions[.zeropage], UInt64(q / basePageSize), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0)
        XCTAssertThrowsError(try RouterPolicy([
            .init(start: a, length: q + 1, policy: ZeroFillPolicy(region: r)),
            .init(start: b, length: q, policy: ZeroFillPolicy(region: r)),
        ]))
    }
}
