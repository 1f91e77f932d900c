import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// The working-set file format, merge, and the checks that make a stale recording an error.
final class WorkingSetTests: XCTestCase {
    let ps = basePageSize

    func sample(_ offsets: [Int], size: Int = 64 * 4096, digest: UInt64 = 42) -> WorkingSet {
        WorkingSet(identity: .init(size: size, digest: digest), pageSize: 4096,
                   entries: offsets.enumerated().map { .init(offset: $0.element * 4096, nanoseconds: UInt64($0.offset) * 1000) })
    }

    func testFileRoundTripAndSummary() throws {
        let ws = sample([5, 6, 7, 1, 2, 40])
        XCTAssertEqual(try WorkingSet(decoding: ws.encoded()), ws)
        let path = NSTemporaryDirectory() + "ws-\(getpid()).ws"
        defer { unlink(path) }
        try ws.write(to: path)
        XCTAssertEqual(try WorkingSet(contentsOf: path), ws)
        let s = ws.summary
        XCTAssertEqual(s.pages, 6)
        XCTAssertEqual(s.contiguousRuns, 3) // 5-7, 1-2, 40
        XCTAssertEqual(s.lowestOffset, 4096)
        XCTAssertEqual(s.highestOffset, 40 * 4096)
        XCTAssertEqual(s.lastNanoseconds, 5000)
        XCTAssertEqual(s.coverage, 6.0 / 64.0, accuracy: 1e-9)
    }

    func testCorruptTruncatedForeignAndNewerFilesAreErrors() {
        let good = sample([1, 2, 3]).encoded()
        func rejects(_ bytes: [UInt8], _ what: String, line: UInt = #line) {
            XCTAssertThrowsError(try WorkingSet(decoding: bytes), line: line) { e in
                let d = (e as? UffdError)?.detail ?? ""
                XCTAssertTrue(d.contains(what), "\(d)", line: line)
            }
        }
        var flipped = good
        flipped[WorkingSet.headerBytes + 3] ^= 0x10
        rejects(flipped, "checksum")
        rejects(Array(good.dropLast(9)), "truncated")
        rejects(Array("not a working set at all".utf8), "not a working-set file")
        var newer = good
        newer[8] = 2
        rejects(newer, "format version 2")
        // A hand-made file naming one page twice.
        var dup = sample([1, 1])
        dup.entries[1].nanoseconds = 7
        rejects(dup.encoded(), "recorded twice")
    }

    func testMergeKeepsPagesOfEveryInputOrderedByAveragePosition() throws {
        let a = sample([0, 1, 2, 3]), b = sample([2, 0, 1, 5])
        let all = try WorkingSet.merged([a, b])
        // Average ranks: page 0 → 0.5, page 2 → 1, page 1 → 1.5; 3 and 5 are in one input only.
        XCTAssertEqual(all.entries.map { $0.offset / 4096 }, [0, 2, 1])
        XCTAssertEqual(all.runs, 2)
        XCTAssertEqual(all.entries[0].nanoseconds, 500) // (0 + 1000) / 2
        let any = try WorkingSet.merged([a, b], minCount: 1)
        XCTAssertEqual(any.entries.map { $0.offset / 4096 }, [0, 2, 1, 3, 5])
        XCTAssertThrowsError(try WorkingSet.merged([a, b], minCount: 3))
        XCTAssertThrowsError(try WorkingSet.merged([a, sample([1], digest: 43)])) { e in
            XCTAssertTrue((e as? UffdError)?.detail.contains("another image") ?? false, "\(e)")
        }
    }

    func testPageSizeConversion() {
        let ws = sample([0, 1, 600, 513, 2])
        XCTAssertEqual(ws.offsets(forPageSize: 2 << 20), [0, 2 << 20]) // first base page of each huge page, in order
        var huge = ws
        huge.pageSize = 8192
        huge.entries = [.init(offset: 8192, nanoseconds: 0)]
        XCTAssertEqual(huge.offsets(forPageSize: 4096), [8192, 12288])
    }

    /// A recording from another image (other contents, other size) or with pages past the end of
    /// the memory is refused when the prefetcher is made: nothing is installed.
    func testStaleOrMismatchedRecordingIsAnErrorAtStart() throws {
        let len = 64 * ps
        let source = PatternSource(length: len, seed: 1)
        let id = try WorkingSet.Identity(of: source)
        XCTAssertEqual(id, try WorkingSet.Identity(of: PatternSource(length: len, seed: 1)))
        let region = try MappedRegion(.anonymous(), length: len)
        let uffd = try Userfaultfd()
        try uffd.register(region, modes: .missing)
        let range = ServedRange(region: region)
        let good = WorkingSet(identity: id, pageSize: ps, entries: [.init(offset: 3 * ps, nanoseconds: 0)])
        XCTAssertNoThrow(try Prefetcher(uffd: uffd, range: range, source: source, workingSet: good))

        func refused(_ ws: WorkingSet, _ src: any PageSource, _ what: String, line: UInt = #line) {
            XCTAssertThrowsError(try Prefetcher(uffd: uffd, range: range, source: src, workingSet: ws), line: line) { e in
                XCTAssertTrue((e as? UffdError)?.detail.contains(what) ?? false, "\(e)", line: line)
            }
        }
        refused(good, PatternSource(length: len, seed: 2), "another version")
        refused(good, PatternSource(length: len - ps, seed: 1), "image of \(len) bytes")
        var past = good
        past.entries.append(.init(offset: len, nanoseconds: 1))
        refused(past, source, "past the end")
        // A file image rewritten in the middle of a sampled piece.
        let path = NSTemporaryDirectory() + "ws-img-\(getpid())"
        defer { unlink(path) }
        let bytes = [UInt8](repeating: 7, count: len)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let fileID = try WorkingSet.Identity(of: try FileSource(path: path))
        var changed = bytes
        changed[len / 17 * 3 + 5] = 8
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(changed)))
        XCTAssertNotEqual(fileID, try WorkingSet.Identity(of: try FileSource(path: path)))
        // Nothing was installed by the refused prefetchers: the page still faults.
        let handler = FaultHandler(uffd: uffd, policy: CopyPolicy(range: range, source: source))
        try handler.start()
        let base = region.address
        withWatchdog(30, onTimeout: { uffd.close(); handler.stop() }) {
            XCTAssertEqual(loadWord(base + UInt(3 * 4096)), PatternSource.word(at: 3 * 4096, seed: 1))
        }
        handler.stop()
        XCTAssertEqual(handler.stats().missingFaults, 1)
    }

    /// The recorder keeps each page's first fault, in fault order, with non-decreasing times.
    func testRecorderKeepsFirstFaultsInOrder() throws {
        let pages = 128, len = pages * ps
        let region = try MappedRegion(.anonymous(), length: len)
        let range = ServedRange(region: region)
        let tracker = try WorkingSetTracker(range: range, recording: true)
        let source = PatternSource(length: len)
        let s = try Session(region) { _ in WorkingSetPolicy(CopyPolicy(range: range, source: source), tracker: tracker) }
        var order = Array(0..<pages)
        var x: UInt64 = 12345
        for i in stride(from: pages - 1, to: 0, by: -1) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            order.swapAt(i, Int(x % UInt64(i + 1)))
        }
        let touched = Array(order.prefix(100))
        let base = region.address
        s.run {
            for p in touched { XCTAssertNotEqual(loadWord(base + UInt(p * 4096)), 1) }
            for p in touched.prefix(10) { XCTAssertNotEqual(loadWord(base + UInt(p * 4096)), 1) } // no new faults
        }
        _ = s.finish()
        let ws = tracker.workingSet(identity: try WorkingSet.Identity(of: source))
        XCTAssertEqual(ws.entries.map { $0.offset / ps }, touched)
        XCTAssertEqual(ws.entries.map(\.nanoseconds), ws.entries.map(\.nanoseconds).sorted())
        XCTAssertEqual(tracker.faultedPages, 100)
    }

    /// A fault on a page the filler installs is "late" whichever side marks the page first:
    /// noted after the copy (queued before it), or noted between the filler's check and its
    /// UFFDIO_COPY (the fault's own copy then meets EEXIST). The second order once went
    /// uncounted, so faults + prefetched - late overcounted the pages present by one.
    func testLateFaultCountedWhicheverSideMarksThePageFirst() throws {
        let region = try MappedRegion(.anonymous(), length: 8 * ps)
        let range = ServedRange(region: region)
        let tracker = try WorkingSetTracker(range: range, recording: true)
        let base = region.address
        tracker.notePrefetched(firstPage: 1, count: 1)
        tracker.noteFault(base + UInt(1 * ps))          // queued before the copy
        XCTAssertEqual(tracker.faultsOnPrefetchedPages, 1)
        tracker.noteFault(base + UInt(2 * ps))          // noted while the copy was in flight
        tracker.notePrefetched(firstPage: 2, count: 2)  // page 3: no fault, not late
        XCTAssertEqual(tracker.faultsOnPrefetchedPages, 2)
        tracker.noteFault(base + UInt(5 * ps))          // resolved by its fault alone
        let faults = 3, prefetched = 3
        let present = (0..<8).filter { tracker.faulted(page: $0) || tracker.prefetched(page: $0) }.count
        XCTAssertEqual(faults + prefetched - tracker.faultsOnPrefetchedPages, present)
        XCTAssertEqual(tracker.workingSet(identity: try WorkingSet.Identity(of: PatternSource(length: 8 * ps))).entries.map { $0.offset / ps }, [1, 2, 5],
                       "the recording holds each faulted page once")
    }
}
