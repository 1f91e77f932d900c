import CUffd
import Dispatch
import Foundation
import Synchronization
import SystemPackage
import XCTest
@testable import UffdKit

/// Pattern bytes (a PageSource for the recording's identity, a DeferredSource for the handler
/// and the filler) that hold every request until the test finishes it. Requests are kept in
/// arrival order, so which one is the prefetch's and which the fault's is known from the order
/// the test made them happen in.
private final class OrderedSource: PageSource, DeferredSource, @unchecked Sendable {
    let length: Int
    let chunkSize: Int
    let data: UnsafeMutableRawPointer
    private let requests = Mutex<[(offset: Int, length: Int, fetch: DeferredFetch)]>([])

    init(length: Int, chunkSize: Int) {
        self.length = length
        self.chunkSize = chunkSize
        data = .allocate(byteCount: length, alignment: 4096)
        fillPattern(data, length, seed: 41)
    }

    deinit { data.deallocate() }

    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        UnsafeRawPointer(data + offset)
    }

    func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        requests.withLock { $0.append((offset, length, fetch)) }
    }

    var count: Int { requests.withLock { $0.count } }

    /// Where request `i` starts and how long it is.
    func request(_ i: Int) -> (offset: Int, length: Int) {
        requests.withLock { ($0[i].offset, $0[i].length) }
    }

    /// Delivers the bytes of request `i` (on the calling thread: when this returns, the copy is
    /// done and the table's entry free).
    func deliver(_ i: Int) -> DeferredOutcome {
        let h = requests.withLock { $0[i] }
        return h.fetch.deliver(UnsafeRawBufferPointer(start: data + h.offset, count: h.length))
    }

    /// Fails every request not finished yet (after a failed assertion: nothing is left waiting).
    func failAll() {
        for h in requests.withLock({ $0 }) { _ = h.fetch.fail(Errno.ioError) }
    }
}

/// Serves a fault by fetching only `pages` (page indexes inside the fault's chunk, which must
/// hold the fault) through the handler's table: a fault's fetch that fills part of a chunk,
/// so a prefetch of that chunk later copies the rest and meets EEXIST on this part.
private struct PartOfChunkPolicy: FaultPolicy {
    let destination: UInt
    let source: OrderedSource
    let pages: Range<Int>

    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let page = basePageSize
        let chunk = Int(fault.address - destination) / source.chunkSize * source.chunkSize
        let offset = chunk + pages.lowerBound * page
        switch try context.deferFill(destination + UInt(offset), length: pages.count * page) {
        case .fetch(let f): source.fetch(offset: offset, length: pages.count * page, into: f)
        case .joined: break
        }
        return .deferred
    }
}

/// The deferred prefetch's "faults avoided" race (fixed in ee628a0), made to happen every time.
///
/// A fault's own fetch fills (all or part of) a chunk after the filler decided to prefetch that
/// chunk and before its claim's copy: the claim's UFFDIO_COPY meets EEXIST and copies nothing
/// (or only the rest). The pages the fault's fetch installed never fault, so a filler that marks
/// the whole chunk as prefetched reports them as faults avoided: more faults avoided than pages
/// it installed (CI once saw "1023 avoided of 512 installed" in ServeRemotePrefetchTests).
///
/// The order is forced with the source, not with timing: every request is held until the test
/// delivers it. With one prefetch fetch in flight (`deferredFetches = 1`) the filler claims
/// chunk A and waits for it; meanwhile a real thread faults in chunk C, the handler's
/// DeferredCopyPolicy starts the fault's own fetch of C (A's claim does not cover it), the test
/// delivers it and the thread returns; only then is A delivered, so the filler goes on to C
/// (one recorded page of it faulted, the others not: it claims C) and the test delivers that
/// claim into a chunk already filled.
final class DeferredPrefetchRaceTests: XCTestCase {
    let page = basePageSize
    /// Pages per chunk (the source's unit, the unit of a fault's fetch and of a claim).
    let chunkPages = 16
    var chunk: Int { chunkPages * page }

    struct Outcome {
        var stats = Prefetcher.Stats()
        var handler = HandlerStats()
        /// The delivery of the filler's claim of chunk C.
        var claimOfC: DeferredOutcome? = nil
        /// Pages of chunk C the tracker holds as prefetched.
        var prefetchedInC: [Int] = []
        /// Faults while reading every page of A and C back (all present: none expected).
        var faultsOnReadBack = -1
        var bytesRight = false
    }

    /// Pages of chunk A recorded (A is chunk 0, its claim installs all 16 pages: 4 recorded, 12
    /// extra). Sparse, as a real recording: with every page recorded the old accounting
    /// overstated "installed" as much as "avoided" and the two could not be told apart.
    let aRecorded = [0, 3, 9, 15]

    /// Runs the race: chunk A = chunk 0, chunk C = chunk 2; recorded: ``aRecorded`` of A, then
    /// `cRecorded` of C. A thread faults on page `faultPage` of C (one of `cRecorded`); its
    /// fetch is the handler's policy's: the whole chunk (`part` nil: DeferredCopyPolicy, as in
    /// production) or only the pages `part` of it.
    private func race(cRecorded: [Int], faultPage: Int, part: Range<Int>?) throws -> Outcome {
        let page = self.page, chunk = self.chunk, chunkPages = self.chunkPages
        let len = 4 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = OrderedSource(length: len, chunkSize: chunk)
        let range = ServedRange(region: r)
        let tracker = try WorkingSetTracker(range: range, recording: false)
        var ho = FaultHandler.Options()
        ho.fallback = .zeroFill
        let s = try Session(r, options: ho) { _ in
            if let part {
                return WorkingSetPolicy(PartOfChunkPolicy(destination: r.address, source: src, pages: part), tracker: tracker)
            }
            return WorkingSetPolicy(DeferredCopyPolicy(destination: r.address, source: src), tracker: tracker)
        }
        let a = 0, c = 2 * chunk
        precondition(cRecorded.contains(faultPage))
        let recorded = aRecorded.map { a + $0 * page } + cRecorded.map { c + $0 * page }
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: src), pageSize: page,
                            entries: recorded.map { .init(offset: $0, nanoseconds: 0) })
        var po = Prefetcher.Options()
        po.deferredFetches = 1
        let p = try Prefetcher(uffd: s.uffd, range: range, source: src, workingSet: ws, tracker: tracker, options: po)
        let base = r.address
        let result = Box(Outcome())
        let ok = s.run(60) {
            defer { if src.count < 3 { src.failAll() } }
            try! p.start(alongside: s.handler)
            // 1. The filler claims A and, with one fetch allowed in flight, waits for it.
            guard eventually(10, { src.count == 1 }) else { return XCTFail("the filler did not claim chunk A") }
            XCTAssertEqual(src.request(0).offset, a, "the first request is the prefetch's claim of A")
            XCTAssertEqual(p.stats().deferredChunks, 1)

            // 2. A real thread faults in C: not covered by A's claim, so its own fetch.
            let faultAt = base + UInt(c + faultPage * page + 7)
            let got = Box(-1)
            let returned = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let v = readByte(faultAt)
                got.update { $0 = Int(v) }
                returned.signal()
            }
            guard eventually(10, { src.count == 2 }) else { return XCTFail("the fault did not start its own fetch") }
            let own = src.request(1)
            XCTAssertEqual(own.offset, c + (part?.lowerBound ?? 0) * page, "the second request is the fault's fetch in C")
            XCTAssertEqual(s.handler.stats().deferredFetches, 1)
            XCTAssertEqual(returned.wait(timeout: .now() + 0.05), .timedOut, "the fault returned before its fetch arrived")

            // 3. The fault's fetch installs first; the thread gets its byte.
            XCTAssertEqual(src.deliver(1), .resolved)
            guard returned.wait(timeout: .now() + 10) == .success else { return XCTFail("the faulting thread hangs") }
            XCTAssertEqual(got.value, Int(src.data.load(fromByteOffset: c + faultPage * page + 7, as: UInt8.self)))

            // 4. Only now A arrives: the filler goes on to C and claims it (one recorded page of
            // C faulted, the rest did not), and that claim's copy meets the fault's pages.
            XCTAssertEqual(src.deliver(0), .resolved)
            guard eventually(10, { src.count == 3 }) else { return XCTFail("the filler did not claim chunk C") }
            XCTAssertEqual(src.request(2).offset, c, "the third request is the prefetch's claim of C")
            XCTAssertEqual(src.request(2).length, chunk)
            let claim = src.deliver(2)
            guard p.wait(timeout: 10) else { return XCTFail("the filler did not end") }

            // Every page of A and C is present: reading them back faults nothing.
            let before = s.handler.stats().faults
            for pg in 0..<chunkPages {
                _ = readByte(base + UInt(a + pg * page))
                _ = readByte(base + UInt(c + pg * page))
            }
            let after = s.handler.stats().faults
            let right = memcmp(UnsafeRawPointer(bitPattern: base + UInt(a))!, src.data + a, chunk) == 0
                && memcmp(UnsafeRawPointer(bitPattern: base + UInt(c))!, src.data + c, chunk) == 0
            let inC = (0..<chunkPages).filter { tracker.prefetched(page: c / page + $0) }
            result.update {
                $0.claimOfC = claim
                $0.faultsOnReadBack = Int(after - before)
                $0.bytesRight = right
                $0.prefetchedInC = inC
            }
        }
        XCTAssertTrue(ok)
        let st = p.stats()
        p.stop()
        let hs = s.finish()
        result.update {
            $0.stats = st
            $0.handler = hs
        }
        return result.value
    }

    /// The fault's own fetch filled the whole chunk C first (the production DeferredCopyPolicy;
    /// C's recorded pages 1, 5, 10, 14, the fault on 5): the filler's claim of C copies nothing,
    /// so nothing of C is the prefetch's. Installed: A's 16 pages (4 recorded + 12 extra), and
    /// faults avoided are exactly those 16. Before the fix every page of C but the faulted one
    /// counted as avoided: 31 avoided of 19 reported installed (3 of C's recorded pages were
    /// counted as prefetched although nothing was copied).
    func testClaimOfAChunkAFaultsFetchFilledFirstAvoidsNoFaults() throws {
        let o = try race(cRecorded: [1, 5, 10, 14], faultPage: 5, part: nil)
        let st = o.stats
        let installed = st.prefetchedPages + st.extraPages
        XCTAssertEqual(o.claimOfC, .existed, "the claim's copy met the fault's pages (the race happened)")
        XCTAssertLessThanOrEqual(st.faultsAvoided ?? .max, installed,
                                 "faults avoided \(st.faultsAvoided ?? -1) of \(installed) installed")
        XCTAssertEqual(st.faultsAvoided, chunkPages, "faults avoided: A's pages, none of C's")
        XCTAssertEqual(o.prefetchedInC, [], "pages of C marked prefetched though the claim copied none")
        XCTAssertEqual(installed, chunkPages, "installed: chunk A only")
        XCTAssertEqual(st.plannedPages, 8)
        XCTAssertEqual(st.prefetchedPages, 4, "A's recorded pages; none of C's")
        XCTAssertEqual(st.alreadyPresentPages, 4, "C's recorded pages were all present when its claim copied")
        XCTAssertEqual(st.extraPages, chunkPages - 4)
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.deferredChunks, 2, "A and C claimed")
        XCTAssertEqual(st.faultsJoined, 0)
        XCTAssertEqual(st.chunksTakenByFaults, 0, "C's fault fetch had ended before the claim")
        XCTAssertEqual(st.droppedFetches, 0)
        XCTAssertEqual(st.faultsOnPrefetchedPages, 0)
        XCTAssertEqual(o.handler.deferredFetches, 1, "one fetch of the fault's own")
        XCTAssertEqual(o.handler.deferredJoined, 0)
        XCTAssertEqual(o.handler.faults, 1)
        XCTAssertEqual(o.handler.fallbacks + o.handler.failures, 0)
        XCTAssertEqual(o.faultsOnReadBack, 0, "a page of A or C was not present")
        XCTAssertTrue(o.bytesRight, "wrong bytes in A or C")
    }

    /// The fault's fetch filled the second half of C first (pages 8..<16; C's recorded pages
    /// 2, 6, 12, the fault on 12): the claim copies the first half (8 pages: recorded 2 and 6,
    /// 6 extra) and meets EEXIST on the rest. Installed: 16 of A + 8 of C; faults avoided the
    /// same 24, C's marked pages exactly the 8 copied. Before the fix the 7 pages of the second
    /// half that never faulted counted too: 31 avoided of 24 installed.
    func testClaimOfAChunkAFaultsFetchPartlyFilledCountsOnlyWhatItCopied() throws {
        let half = chunkPages / 2
        let o = try race(cRecorded: [2, 6, 12], faultPage: 12, part: half..<chunkPages)
        let st = o.stats
        let installed = st.prefetchedPages + st.extraPages
        XCTAssertEqual(o.claimOfC, .existed, "the claim's copy met the fault's pages (the race happened)")
        XCTAssertLessThanOrEqual(st.faultsAvoided ?? .max, installed,
                                 "faults avoided \(st.faultsAvoided ?? -1) of \(installed) installed")
        XCTAssertEqual(st.faultsAvoided, chunkPages + half, "faults avoided: A's pages and the half of C copied")
        XCTAssertEqual(o.prefetchedInC, Array(0..<half), "C's pages marked prefetched: the ones the claim copied")
        XCTAssertEqual(installed, chunkPages + half, "installed: A, and half of C")
        XCTAssertEqual(st.plannedPages, 7)
        XCTAssertEqual(st.prefetchedPages, 4 + 2)
        XCTAssertEqual(st.alreadyPresentPages, 1, "C's page 12 (faulted)")
        XCTAssertEqual(st.extraPages, (chunkPages - 4) + (half - 2))
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.deferredChunks, 2)
        XCTAssertEqual(st.chunksTakenByFaults, 0)
        XCTAssertEqual(st.droppedFetches, 0)
        XCTAssertEqual(st.faultsOnPrefetchedPages, 0)
        XCTAssertEqual(o.handler.deferredFetches, 1)
        XCTAssertEqual(o.handler.faults, 1)
        XCTAssertEqual(o.handler.fallbacks + o.handler.failures, 0)
        XCTAssertEqual(o.faultsOnReadBack, 0, "a page of A or C was not present")
        XCTAssertTrue(o.bytesRight, "wrong bytes in A or C")
    }
}
