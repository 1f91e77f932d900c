import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// Record a working set on one region, prefetch it into a fresh one, verify every byte; faults
/// racing the filler; stop; the served process going away mid-way.
final class PrefetchTests: XCTestCase {
    static let seed: UInt64 = 0xC0FFEE

    /// A fixed shuffled order of `count` of `pages` page indexes.
    func scattered(_ pages: Int, count: Int, salt: UInt64 = 7) -> [Int] {
        var order = Array(0..<pages)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ salt
        for i in stride(from: pages - 1, to: 0, by: -1) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            order.swapAt(i, Int(x % UInt64(i + 1)))
        }
        return Array(order.prefix(count))
    }

    /// Every word of the region equals the pattern.
    func assertPattern(_ region: MappedRegion, line: UInt = #line) {
        let w = region.pointer.assumingMemoryBound(to: UInt64.self)
        var bad = 0, first = -1
        for i in 0..<(region.length / 8) where w[i] != PatternSource.word(at: i * 8, seed: Self.seed) {
            bad += 1
            if first < 0 { first = i * 8 }
        }
        XCTAssertEqual(bad, 0, "words differ from the pattern, first at offset \(first)", line: line)
    }

    func recordThenPrefetch(_ kind: MappedRegion.Kind, features: Features, pages: Int, recorded: Int) throws {
        // Run 1: record the pages a reader touches, in its scattered order.
        let r1 = try MappedRegion(kind, length: 0 + pages * (kind == .hugetlb ? hugePageSize! : basePageSize))
        let ps = r1.pageSize, len = r1.length
        let source = PatternSource(length: len, seed: Self.seed)
        let identity = try WorkingSet.Identity(of: source)
        let range1 = ServedRange(region: r1)
        let recorder = try WorkingSetTracker(range: range1, recording: true)
        let s1 = try Session(r1, features: features) { _ in WorkingSetPolicy(CopyPolicy(range: range1, source: source), tracker: recorder) }
        let order = scattered(pages, count: recorded)
        let base1 = r1.address
        s1.run { for p in order { XCTAssertNotEqual(loadWord(base1 + UInt(p * ps) + 8), 1) } }
        _ = s1.finish()
        let ws = recorder.workingSet(identity: identity)
        XCTAssertEqual(ws.entries.map { $0.offset / ps }, order)
        // Through the file, as a later restore would read it.
        let path = NSTemporaryDirectory() + "prefetch-\(getpid()).ws"
        defer { unlink(path) }
        try ws.write(to: path)
        let loaded = try WorkingSet(contentsOf: path)

        // Run 2: a fresh region; the filler installs the recording before anything is touched.
        let r2 = try MappedRegion(kind, length: len)
        let range2 = ServedRange(region: r2)
        let tracker = try WorkingSetTracker(range: range2, recording: false)
        let s2 = try Session(r2, features: features) { _ in WorkingSetPolicy(CopyPolicy(range: range2, source: source), tracker: tracker) }
        var o = Prefetcher.Options()
        o.batchBytes = 4 * ps
        let p = try Prefetcher(uffd: s2.uffd, range: range2, source: source, workingSet: loaded, tracker: tracker, options: o)
        try p.start(alongside: s2.handler)
        XCTAssertTrue(p.wait(timeout: 30), "the filler did not finish")
        var st = p.stats()
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.plannedPages, recorded)
        XCTAssertEqual(st.prefetchedPages, recorded, "\(st)")
        XCTAssertEqual(st.alreadyPresentPages + st.skippedPages, 0, "\(st)")
        XCTAssertNotNil(st.timeToLastPage)
        XCTAssertEqual(s2.handler.stats().faults, 0, "nothing touched yet")
        // Every byte: the recorded pages read without a fault, the others fault in.
        let base2 = r2.address, count = len / ps
        s2.run { for i in 0..<count { XCTAssertNotEqual(loadWord(base2 + UInt(i * ps)), 1) } }
        let hs = s2.finish()
        XCTAssertEqual(Int(hs.faults), pages - recorded, "\(hs)")
        assertPattern(r2)
        st = p.stats(used: { _ in true })
        XCTAssertEqual(st.faultsAvoided, recorded)
        XCTAssertEqual(st.faultsOnPrefetchedPages, 0)
        XCTAssertEqual(st.usedPages, recorded)
        XCTAssertEqual(st.wastedBytes, 0)
    }

    func testRecordThenPrefetchVerifiesEveryByte_anon() throws {
        try recordThenPrefetch(.anonymous(), features: [], pages: 2048, recorded: 700)
    }

    func testRecordThenPrefetchVerifiesEveryByte_shmem() throws {
        try require([.missingShmem])
        try recordThenPrefetch(.shmem, features: [.missingShmem], pages: 2048, recorded: 700)
    }

    func testRecordThenPrefetchVerifiesEveryByte_hugetlb() throws {
        try require([.missingHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let pages = 8
        let ok = try withHugePages(2 * pages + 1) {
            try recordThenPrefetch(.hugetlb, features: [.missingHugetlbfs], pages: pages, recorded: 5)
        }
        if !ok { throw XCTSkip("cannot reserve \(2 * pages + 1) huge pages of \(huge >> 10) KiB (vm.nr_hugepages)") }
    }

    /// One image served as two regions (as a VM's memory file in two memory regions): each
    /// region recorded by its own tracker at its image offset, the recordings combined into one
    /// in image offsets, then each region of a fresh pair prefetched from the whole-image
    /// recording with the image's identity: every byte verified, each region gets its own pages.
    func testRegionsOfOneImageRecordAndPrefetchAtTheirImageOffsets() throws {
        let ps = basePageSize, half = 512, len = half * ps
        let image = PatternSource(length: 2 * len, seed: Self.seed)
        let identity = try WorkingSet.Identity(of: image)
        let slices = [Slice(image, offset: 0, length: len), Slice(image, offset: len, length: len)]
        func serve(_ regions: [MappedRegion], recording: Bool) throws -> ([Session], [WorkingSetTracker], [ServedRange]) {
            var sessions: [Session] = [], trackers: [WorkingSetTracker] = [], ranges: [ServedRange] = []
            for (i, r) in regions.enumerated() {
                let range = ServedRange(region: r)
                let t = try WorkingSetTracker(range: range, recording: recording, imageOffset: i * len)
                sessions.append(try Session(r) { _ in WorkingSetPolicy(CopyPolicy(range: range, source: slices[i]), tracker: t) })
                trackers.append(t)
                ranges.append(range)
            }
            return (sessions, trackers, ranges)
        }
        let first = [try MappedRegion(.anonymous(), length: len), try MappedRegion(.anonymous(), length: len)]
        let (s1, t1, _) = try serve(first, recording: true)
        let touched = scattered(2 * half, count: 300, salt: 5)
        let bases = first.map(\.address)
        s1[0].run {
            for p in touched { XCTAssertNotEqual(loadWord(bases[p / half] + UInt((p % half) * ps)), 1) }
        }
        for s in s1 { _ = s.finish() }
        let ws = try WorkingSet.combined(t1.map { $0.workingSet(identity: identity) })
        XCTAssertEqual(Set(ws.entries.map { $0.offset / ps }), Set(touched))
        XCTAssertEqual(ws.entries.count, 300)

        let second = [try MappedRegion(.anonymous(), length: len), try MappedRegion(.anonymous(), length: len)]
        let (s2, t2, r2) = try serve(second, recording: false)
        var prefetched = 0
        for i in 0..<2 {
            XCTAssertThrowsError(try Prefetcher(uffd: s2[i].uffd, range: r2[i], source: slices[i], workingSet: ws, tracker: t2[i],
                                                imageOffset: i * len)) // no image identity: refused
            let p = try Prefetcher(uffd: s2[i].uffd, range: r2[i], source: slices[i], workingSet: ws, tracker: t2[i],
                                   imageOffset: i * len, imageIdentity: identity)
            try p.start(alongside: s2[i].handler)
            XCTAssertTrue(p.wait(timeout: 30))
            let st = p.stats()
            XCTAssertEqual(st.plannedPages, touched.filter { $0 / half == i }.count)
            XCTAssertEqual(st.prefetchedPages, st.plannedPages, "\(st)")
            prefetched += st.prefetchedPages
        }
        XCTAssertEqual(prefetched, 300)
        let bases2 = second.map(\.address)
        s2[0].run {
            for i in 0..<2 { for pg in 0..<half { XCTAssertNotEqual(loadWord(bases2[i] + UInt(pg * ps)), 1) } }
        }
        var faults = 0
        for s in s2 { faults += Int(s.finish().faults) }
        XCTAssertEqual(faults, 2 * half - 300)
        for (i, r) in second.enumerated() {
            let w = r.pointer.assumingMemoryBound(to: UInt64.self)
            var bad = 0
            for k in 0..<(len / 8) where w[k] != PatternSource.word(at: i * len + k * 8, seed: Self.seed) { bad += 1 }
            XCTAssertEqual(bad, 0, "region \(i)")
        }
    }

    /// Threads fault on the very pages the filler installs, in the same order and in reverse:
    /// each page is resolved once (the loser gets EEXIST, counted, never an error), every byte
    /// is right, nobody hangs.
    func testFaultsRacingTheFillerOnTheSamePages() throws {
        let pages = 8192, ps = basePageSize, len = pages * ps
        let region = try MappedRegion(.anonymous(), length: len)
        let source = PatternSource(length: len, seed: Self.seed)
        let order = scattered(pages, count: pages, salt: 99)
        let ws = WorkingSet(identity: try .init(of: source), pageSize: ps,
                            entries: order.map { .init(offset: $0 * ps, nanoseconds: 0) })
        let range = ServedRange(region: region)
        let tracker = try WorkingSetTracker(range: range, recording: false)
        var ho = FaultHandler.Options()
        ho.readers = 2
        let s = try Session(region, options: ho) { _ in WorkingSetPolicy(CopyPolicy(range: range, source: source), tracker: tracker) }
        var o = Prefetcher.Options()
        o.batchBytes = 16 * ps
        let p = try Prefetcher(uffd: s.uffd, range: range, source: source, workingSet: ws, tracker: tracker, options: o)
        let base = region.address
        try p.start(alongside: s.handler)
        s.run {
            DispatchQueue.concurrentPerform(iterations: 2) { t in
                let mine = t == 0 ? order : order.reversed()
                var sum: UInt64 = 0
                for pg in mine { sum &+= loadWord(base + UInt(pg * ps)) }
                XCTAssertNotEqual(sum, 1)
            }
        }
        XCTAssertTrue(p.wait(timeout: 30))
        let st = p.stats()
        let hs = s.finish()
        assertPattern(region)
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.skippedPages, 0, "\(st)")
        // Each page was installed exactly once: by the filler or by a fault.
        XCTAssertEqual(st.prefetchedPages + st.alreadyPresentPages, pages, "\(st)")
        XCTAssertEqual(Int(hs.resolutions[.copy] ?? 0) - Int(hs.existed) + st.prefetchedPages, pages, "\(hs) \(st)")
        XCTAssertEqual(hs.fallbacks + hs.failures, 0, "\(hs) \(s.handler.failures().prefix(1))")
        // Who won each page depends on scheduling (both sides usually win some); either way once.
    }

    /// stop() ends the filler after its current ioctl; the handler goes on serving the rest.
    func testStopEndsTheFillerAndFaultsStillResolve() throws {
        let pages = 16384, ps = basePageSize, len = pages * ps
        let region = try MappedRegion(.anonymous(), length: len)
        let source = PatternSource(length: len, seed: Self.seed)
        let ws = WorkingSet(identity: try .init(of: source), pageSize: ps,
                            entries: scattered(pages, count: pages).map { .init(offset: $0 * ps, nanoseconds: 0) })
        let range = ServedRange(region: region)
        let s = try Session(region) { _ in CopyPolicy(range: range, source: source) }
        var o = Prefetcher.Options()
        o.batchBytes = ps
        let p = try Prefetcher(uffd: s.uffd, range: range, source: source, workingSet: ws, options: o)
        try p.start()
        p.stop()
        let st = p.stats()
        XCTAssertTrue(st.ending == .stopped || st.ending == .finished, "\(st)")
        if st.ending == .stopped { XCTAssertLessThan(st.prefetchedPages, pages) }
        XCTAssertNil(st.faultsAvoided, "no tracker shared with the handler")
        let base = region.address
        s.run { _ = touch(base, length: len, threads: 2) }
        _ = s.finish()
        assertPattern(region)
        // The handler stopping ends a filler started alongside it.
        let r2 = try MappedRegion(.anonymous(), length: len)
        let range2 = ServedRange(region: r2)
        let s2 = try Session(r2) { _ in CopyPolicy(range: range2, source: source) }
        let p2 = try Prefetcher(uffd: s2.uffd, range: range2, source: source, workingSet: ws, options: o)
        s2.handler.stop()
        try p2.start(alongside: s2.handler)
        XCTAssertTrue(p2.wait(timeout: 10))
        XCTAssertEqual(p2.ending, .handlerStopped)
        s2.uffd.close()
    }

    /// The process whose memory is filled exits while the filler runs: the filler ends with
    /// `.processGone` (ESRCH) instead of failing or spinning. The memory is a forked child's,
    /// served through the child's userfaultfd from the fork event.
    func testServedProcessExitingMidway() throws {
        try require([.eventFork])
        let pages = 16384, ps = basePageSize, len = pages * ps
        let region = try MappedRegion(.anonymous(), length: len)
        let source = PatternSource(length: len, seed: Self.seed)
        let ws = WorkingSet(identity: try .init(of: source), pageSize: ps,
                            entries: scattered(pages, count: pages).map { .init(offset: $0 * ps, nanoseconds: 0) })
        let child = Box<Userfaultfd?>(nil)
        final class KeepChild: FaultPolicy, @unchecked Sendable {
            let inner: CopyPolicy
            let child: Box<Userfaultfd?>
            init(_ inner: CopyPolicy, _ child: Box<Userfaultfd?>) { self.inner = inner; self.child = child }
            func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution { try inner.resolve(fault, context: context) }
            func handle(event: Event, context: borrowing FaultContext) {
                if case .fork(let c) = event { child.update { $0 = c } }
            }
        }
        var ho = FaultHandler.Options()
        ho.forkHandling = .release
        let s = try Session(region, features: [.eventFork], options: ho) { _ in
            KeepChild(CopyPolicy(region: region, source: source), child)
        }
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        let pid = fork()
        if pid == 0 {
            // The child touches nothing and leaves when told, while the parent fills its memory.
            var b: UInt8 = 0
            _ = read(fds[0], &b, 1)
            _exit(0)
        }
        close(fds[0])
        XCTAssertGreaterThan(pid, 0)
        var waited = 0
        while child.value == nil && waited < 5000 { usleep(1000); waited += 1 }
        guard let childFD = child.value else {
            XCTFail("no fork event")
            close(fds[1])
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            return
        }
        var o = Prefetcher.Options()
        o.batchBytes = ps // one page per batch: slow enough to be mid-way when the child exits
        // A slow source (200 µs a page, ~3 s for the list) so the exit lands mid-way on any machine.
        let p = try Prefetcher(uffd: childFD, range: ServedRange(region: region), source: Slow(source), workingSet: ws, options: o)
        try p.start()
        // Mid-way: let the filler install some pages, then let the child exit.
        var spins = 0
        while p.stats().prefetchedPages < 200 && p.ending == nil && spins < 10_000 { usleep(500); spins += 1 }
        var one: UInt8 = 1
        _ = write(fds[1], &one, 1)
        close(fds[1])
        XCTAssertTrue(p.wait(timeout: 30), "the filler did not end after the process exited")
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        let st = p.stats()
        XCTAssertEqual(st.ending, .processGone, "\(st)")
        XCTAssertGreaterThanOrEqual(st.prefetchedPages, 200, "\(st)")
        XCTAssertLessThan(st.prefetchedPages, pages, "\(st)")
        _ = s.finish()
    }
}

/// Reads the word at `address` (never optimized away: the fault must happen).
@inline(never)
func loadWord(_ address: UInt) -> UInt64 {
    UnsafePointer<UInt64>(bitPattern: address)!.pointee
}

/// Bytes `[offset, offset+length)` of another source (a region of an image).
struct Slice: PageSource {
    let base: any PageSource
    let offset: Int
    let length: Int
    init(_ base: any PageSource, offset: Int, length: Int) {
        self.base = base
        self.offset = offset
        self.length = length
    }
    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        try base.bytes(at: self.offset + offset, count: count, scratch: scratch)
    }
}

/// A source that takes 200 µs per read (a disk or a network, for timing-independent tests).
struct Slow: PageSource {
    let base: any PageSource
    init(_ base: any PageSource) { self.base = base }
    var length: Int { base.length }
    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        usleep(200)
        return try base.bytes(at: offset, count: count, scratch: scratch)
    }
}
