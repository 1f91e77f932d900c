import CUffd
import Dispatch
import Foundation
import TestServers
import Synchronization
import SystemPackage
import XCTest
@testable import UffdKit

/// Pattern bytes in memory that are both a PageSource (for the recording's identity) and a
/// DeferredSource. `immediate` finishes each request on another thread; `hold` keeps them for
/// the test; `failing` fails every request.
private final class HeldSource: PageSource, DeferredSource, @unchecked Sendable {
    enum Mode { case immediate, hold, failing }
    let length: Int
    let chunkSize: Int
    let data: UnsafeMutableRawPointer
    let mode: Mutex<Mode>
    let held = Mutex<[(offset: Int, length: Int, fetch: DeferredFetch)]>([])
    let requests = Atomic<Int>(0)

    init(length: Int, chunkSize: Int, mode: Mode) {
        self.length = length
        self.chunkSize = chunkSize
        self.mode = Mutex(mode)
        data = .allocate(byteCount: length, alignment: 4096)
        fillPattern(data, length, seed: 23)
    }

    deinit { data.deallocate() }

    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        UnsafeRawPointer(data + offset)
    }

    func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        requests.add(1, ordering: .relaxed)
        switch mode.withLock({ $0 }) {
        case .hold: held.withLock { $0.append((offset, length, fetch)) }
        case .failing: DispatchQueue.global().async { fetch.fail(Errno.ioError) }
        case .immediate:
            DispatchQueue.global().async { fetch.deliver(UnsafeRawBufferPointer(start: self.data + offset, count: length)) }
        }
    }

    var heldCount: Int { held.withLock { $0.count } }
    func take() -> [(offset: Int, length: Int, fetch: DeferredFetch)] { held.withLock { h in defer { h = [] }; return h } }
    func deliverHeld() -> [DeferredOutcome] {
        take().map { $0.fetch.deliver(UnsafeRawBufferPointer(start: data + $0.offset, count: $0.length)) }
    }
    func failHeld() -> [DeferredOutcome] { take().map { $0.fetch.fail(Errno.ioError) } }
}

/// Reads one byte in another thread; `done` is signalled when the read returned.
private func faultInThread(_ addr: UInt, _ got: Box<Int>) -> DispatchSemaphore {
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        let v = readByte(addr)
        got.update { $0 = Int(v) }
        done.signal()
    }
    return done
}

/// The Prefetcher through the handler's table of deferred resolutions (a DeferredSource served
/// by DeferredCopyPolicy): chunks claimed without a fault, faults on them join the prefetch's
/// fetch, a failed or dropped prefetch leaves joined faults to their own fetch (or the
/// fallback), stop with claims in flight.
final class DeferredPrefetchTests: XCTestCase {
    let page = basePageSize
    var chunk: Int { 4 * page }

    private func session(_ r: MappedRegion, _ src: HeldSource) throws -> Session {
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        return try Session(r, options: o) { _ in DeferredCopyPolicy(destination: r.address, source: src) }
    }

    /// A recording of `pages` random pages of the source in a random order.
    private func recording(_ src: HeldSource, pages: Int, seed: UInt64) throws -> (WorkingSet, [Int]) {
        var x = seed
        var all = Array(0..<(src.length / page))
        for i in stride(from: all.count - 1, to: 0, by: -1) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            all.swapAt(i, Int(x % UInt64(i + 1)))
        }
        let order = Array(all.prefix(pages))
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: src), pageSize: page,
                            entries: order.map { .init(offset: $0 * page, nanoseconds: 0) })
        return (ws, order)
    }

    private func prefetcher(_ s: Session, _ r: MappedRegion, _ src: HeldSource, _ ws: WorkingSet, fetches: Int = 16)
        throws -> Prefetcher {
        var po = Prefetcher.Options()
        po.deferredFetches = fetches
        return try Prefetcher(uffd: s.uffd, range: ServedRange(region: r), source: src, workingSet: ws, options: po)
    }

    /// Every recorded chunk arrives through the table (no fault needed); then every byte of
    /// the region is right and no fault was resolved by the fallback.
    func testDeferredPrefetchInstallsEveryRecordedChunk() throws {
        let len = 64 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = HeldSource(length: len, chunkSize: chunk, mode: .immediate)
        let s = try session(r, src)
        let (ws, order) = try recording(src, pages: 96, seed: 0x9E37_79B9)
        let p = try prefetcher(s, r, src, ws, fetches: 4)
        let base = r.address, page = self.page, chunk = self.chunk
        let ok = s.run(30) {
            try! p.start(alongside: s.handler)
            XCTAssertTrue(p.wait(timeout: 20), "the filler did not end")
            // The recorded pages are present: reading them faults nothing.
            let faultsBefore = s.handler.stats().faults
            for pg in order { _ = readByte(base + UInt(pg * page)) }
            XCTAssertEqual(s.handler.stats().faults, faultsBefore, "a prefetched page faulted")
            _ = touch(base, length: len, threads: 4)
            XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, len), 0, "wrong bytes")
            _ = chunk
        }
        XCTAssertTrue(ok)
        let st = p.stats()
        p.stop()
        let hs = s.finish()
        let chunks = Set(order.map { $0 * page / chunk }).count
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.deferredChunks, chunks, "one claim per recorded chunk")
        XCTAssertEqual(st.prefetchedPages + st.alreadyPresentPages, order.count, "every recorded page accounted for")
        XCTAssertEqual(st.prefetchedPages + st.extraPages, chunks * 4, "whole chunks installed")
        XCTAssertEqual(st.droppedFetches, 0)
        XCTAssertEqual(hs.fallbacks + hs.failures, 0)
        XCTAssertEqual(hs.deferredFetches + UInt64(chunks), UInt64(src.requests.load(ordering: .relaxed)),
                       "every request was either the prefetch's or a fault's, never both for one chunk")
        XCTAssertTrue(s.handler.failures().isEmpty)
    }

    /// A fault on a chunk the prefetch has claimed joins it: no request of its own; the
    /// prefetch's delivery wakes it with the right bytes.
    func testFaultJoinsAPrefetchClaim() throws {
        let len = 16 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = HeldSource(length: len, chunkSize: chunk, mode: .hold)
        let s = try session(r, src)
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: src), pageSize: page,
                            entries: (0..<8).map { .init(offset: $0 * self.chunk + self.page, nanoseconds: 0) })
        let p = try prefetcher(s, r, src, ws, fetches: 4)
        let base = r.address, chunk = self.chunk, page = self.page
        let ok = s.run(30) {
            try! p.start(alongside: s.handler)
            XCTAssertTrue(eventually { src.heldCount == 4 }, "4 claims in flight")
            XCTAssertEqual(src.requests.load(ordering: .relaxed), 4, "bounded: never more than deferredFetches")
            let got = Box(-1)
            let done = faultInThread(base + UInt(2 * chunk + 3 * page + 9), got)
            XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 1 }, "the fault did not join the claim")
            XCTAssertEqual(src.requests.load(ordering: .relaxed), 4, "the fault started a fetch of its own")
            XCTAssertEqual(s.handler.stats().deferredFetches, 0)
            src.mode.withLock { $0 = .immediate }
            XCTAssertEqual(Set(src.deliverHeld()), [.resolved])
            XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "the joined fault was not woken")
            XCTAssertEqual(got.value, Int(src.data.load(fromByteOffset: 2 * chunk + 3 * page + 9, as: UInt8.self)))
            XCTAssertTrue(p.wait(timeout: 10))
            _ = touch(base, length: len, threads: 2)
            XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, len), 0, "wrong bytes")
        }
        XCTAssertTrue(ok)
        let st = p.stats()
        let hs = s.finish()
        XCTAssertEqual(st.faultsJoined, 1)
        XCTAssertEqual(st.deferredChunks, 8)
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(hs.fallbacks + hs.failures, 0)
    }

    /// The prefetch's fetch fails: the joined fault is not given the fallback for it; it is
    /// woken, re-faults and gets its own fetch (delivered here: right bytes). With the source
    /// failing for its own fetch too, it gets the fallback exactly as an on-demand fault.
    func testFailedPrefetchLeavesJoinedFaultsToTheirOwnFetch() throws {
        for ownFetchFails in [false, true] {
            let len = 16 * chunk
            let r = try MappedRegion(.anonymous(), length: len)
            let src = HeldSource(length: len, chunkSize: chunk, mode: .hold)
            let s = try session(r, src)
            let ws = WorkingSet(identity: try WorkingSet.Identity(of: src), pageSize: page,
                                entries: (0..<4).map { .init(offset: $0 * self.chunk, nanoseconds: 0) })
            let p = try prefetcher(s, r, src, ws, fetches: 4)
            let base = r.address, chunk = self.chunk
            let ok = s.run(30) {
                try! p.start(alongside: s.handler)
                XCTAssertTrue(eventually { src.heldCount == 4 })
                let got = Box(-1)
                let done = faultInThread(base + UInt(chunk + 77), got)
                XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 1 }, "the fault did not join")
                src.mode.withLock { $0 = ownFetchFails ? .failing : .immediate }
                XCTAssertEqual(Set(src.failHeld()), [.cancelled], "a failed prefetch is dropped, not given the fallback")
                XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "the joined fault hangs")
                let expected = ownFetchFails ? 0 : Int(src.data.load(fromByteOffset: chunk + 77, as: UInt8.self))
                XCTAssertEqual(got.value, expected)
                XCTAssertTrue(p.wait(timeout: 10))
            }
            XCTAssertTrue(ok)
            let st = p.stats()
            let hs = s.finish()
            XCTAssertEqual(st.droppedFetches, 4)
            XCTAssertEqual(st.sourceErrors, 4)
            XCTAssertEqual(st.prefetchedPages, 0)
            XCTAssertEqual(hs.deferredFetches, 1, "the woken fault asked for its own fetch")
            XCTAssertEqual(hs.fallbacks, ownFetchFails ? 1 : 0, "the fallback only for the fault's own failed fetch")
            XCTAssertEqual(s.handler.failures().count, ownFetchFails ? 1 : 0, "prefetch failures are not fault failures")
        }
    }

    /// stop() with claims in flight and a fault joined: the claims are dropped, the fault gets
    /// its own fetch, the late deliveries change nothing. Then the handler stopping with claims
    /// in flight: they are woken, the filler ends, late deliveries are refused.
    func testStopWithClaimsInFlight() throws {
        let len = 16 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = HeldSource(length: len, chunkSize: chunk, mode: .hold)
        let s = try session(r, src)
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: src), pageSize: page,
                            entries: (0..<16).map { .init(offset: $0 * self.chunk, nanoseconds: 0) })
        let p = try prefetcher(s, r, src, ws, fetches: 4)
        let base = r.address, chunk = self.chunk
        let ok = s.run(30) {
            try! p.start(alongside: s.handler)
            XCTAssertTrue(eventually { src.heldCount == 4 })
            let stale = src.take()
            let got = Box(-1)
            let done = faultInThread(base + UInt(3 * chunk + 5), got)
            XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 1 })
            src.mode.withLock { $0 = .immediate }
            p.stop()
            XCTAssertEqual(p.ending, .stopped)
            XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "the joined fault hangs after stop()")
            XCTAssertEqual(got.value, Int(src.data.load(fromByteOffset: 3 * chunk + 5, as: UInt8.self)))
            for h in stale {
                let o = h.fetch.deliver(UnsafeRawBufferPointer(start: src.data + h.offset, count: h.length))
                XCTAssertTrue(o == .cancelled || o == .alreadyFinished, "late delivery: \(o)")
            }
            // Nothing of the dropped claims was installed: page 0 faults and is served.
            XCTAssertEqual(readByte(base + 1), src.data.load(fromByteOffset: 1, as: UInt8.self))
        }
        XCTAssertTrue(ok)
        XCTAssertEqual(p.stats().droppedFetches, 4)
        _ = s.finish()

        // The handler stops while a second prefetcher's claims are in flight.
        let r2 = try MappedRegion(.anonymous(), length: len)
        let src2 = HeldSource(length: len, chunkSize: chunk, mode: .hold)
        let s2 = try session(r2, src2)
        let p2 = try prefetcher(s2, r2, src2, ws, fetches: 4)
        try p2.start(alongside: s2.handler)
        XCTAssertTrue(eventually { src2.heldCount == 4 })
        _ = s2.finish()
        XCTAssertTrue(p2.wait(timeout: 10), "the filler did not end when the handler stopped")
        XCTAssertEqual(p2.ending, .handlerStopped)
        XCTAssertEqual(Set(src2.deliverHeld()), [.cancelled], "late deliveries after the handler stopped are refused")
    }

    /// A remote source (a real HTTP server, 500 ms per request): the prefetch's fetches are in
    /// flight and a fault joined one when the server is stopped. The prefetch fetches fail and
    /// are dropped; the joined fault re-faults, its own fetch fails too, and it gets the
    /// fallback (zeros) with the reason reported, exactly as an on-demand fault. Nothing hangs.
    func testRemotePrefetchServerStoppedJoinedFaultGetsTheFallback() throws {
        let dir = try makeTempDir("deferredprefetch")
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = makeImage(chunks: 2, zeroEvery: 100, tail: 0)   // 4 MiB
        let file = dir.appendingPathComponent("img")
        try image.write(to: file)
        let server = try MisbehavingServer(serving: file)
        var o = RemoteOptions()
        o.rawChunkSize = 256 << 10
        o.readaheadChunks = 0
        o.maxConnections = 4
        o.retries = 1
        o.backoff = 0.02
        o.requestTimeout = 5
        o.connectTimeout = 2
        let source = try PageSources.open(server.url("latency-500"), options: o) as! ChunkedSource
        let r = try MappedRegion(.anonymous(), length: image.count)
        var ho = FaultHandler.Options()
        ho.fallback = .zeroFill
        let s = try Session(r, options: ho) { _ in DeferredCopyPolicy(destination: r.address, source: source) }
        let cs = source.chunkSize
        let ws = WorkingSet(identity: WorkingSet.Identity(size: source.length, digest: 0), pageSize: page,
                            entries: (0..<(image.count / cs)).map { .init(offset: $0 * cs, nanoseconds: 0) })
        var po = Prefetcher.Options()
        po.deferredFetches = 8
        let p = try Prefetcher(uffd: s.uffd, range: ServedRange(region: r), source: source, workingSet: ws,
                               imageIdentity: WorkingSet.Identity(size: source.length, digest: 0), options: po)
        let base = r.address
        let got = Box(-1)
        let ok = s.run(60) {
            try! p.start(alongside: s.handler)
            XCTAssertTrue(eventually { p.stats().deferredChunks == 8 }, "claims in flight")
            let done = faultInThread(base + UInt(cs + 99), got)
            XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 1 }, "the fault did not join the prefetch")
            server.stop()
            XCTAssertEqual(done.wait(timeout: .now() + 30), .success, "the joined fault hangs")
            XCTAssertTrue(p.wait(timeout: 30), "the filler hangs")
        }
        XCTAssertTrue(ok)
        let st = p.stats()
        let hs = s.finish()
        XCTAssertEqual(got.value, 0, "the fallback (zeros), as for an on-demand fault")
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.droppedFetches, image.count / cs, "every chunk of the list: the first 8 in flight, the rest refused")
        XCTAssertEqual(st.prefetchedPages, 0)
        XCTAssertEqual(hs.deferredFetches, 1, "the woken fault asked for its own fetch")
        XCTAssertEqual(hs.fallbacks, 1)
        XCTAssertEqual(s.handler.failures().count, 1, "one failure: the fault's own fetch, never the prefetch's")
    }

    /// A region of a larger remote image as `serve` builds it (an ``ImageWindow`` for the
    /// filler, a ``DeferredImageWindow`` for the region's policy, 2 MiB into the image): the
    /// filler goes through the deferred table, every byte of the region right.
    func testServeRegionWindowOfARemoteImagePrefetchesThroughTheTable() throws {
        let dir = try makeTempDir("deferredprefetchwindow")
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = makeImage(chunks: 4, zeroEvery: 100, tail: 0)   // 8 MiB
        let file = dir.appendingPathComponent("img")
        try image.write(to: file)
        let server = try MisbehavingServer(serving: file)
        defer { server.stop() }
        var o = RemoteOptions()
        o.rawChunkSize = 64 << 10
        o.readaheadChunks = 0
        o.maxConnections = 4
        let source = try PageSources.open(server.url("ok"), options: o) as! ChunkedSource
        let at = 2 << 20, len = 4 << 20
        let r = try MappedRegion(.anonymous(), length: len)
        var ho = FaultHandler.Options()
        ho.fallback = .zeroFill
        let s = try Session(r, options: ho) { _ in
            DeferredCopyPolicy(destination: r.address, source: DeferredImageWindow(image: source, offset: at, length: len))
        }
        let identity = WorkingSet.Identity(size: image.count, digest: 0)
        let pages = stride(from: at, to: at + len, by: 3 * page).map { $0 }
        let ws = WorkingSet(identity: identity, pageSize: page, entries: pages.reversed().map { .init(offset: $0, nanoseconds: 0) })
        let p = try Prefetcher(uffd: s.uffd, range: ServedRange(region: r), source: ImageWindow(image: source, offset: at, length: len),
                               workingSet: ws, imageOffset: at, imageIdentity: identity)
        let base = r.address
        let ok = s.run(60) {
            try! p.start(alongside: s.handler)
            XCTAssertTrue(p.wait(timeout: 50))
            _ = touch(base, length: len, threads: 2)
        }
        XCTAssertTrue(ok)
        let st = p.stats()
        let hs = s.finish()
        XCTAssertEqual(st.ending, .finished)
        XCTAssertEqual(st.deferredChunks, len / (64 << 10), "every chunk of the region claimed")
        XCTAssertEqual(st.prefetchedPages + st.alreadyPresentPages, pages.count)
        XCTAssertEqual(hs.fallbacks + hs.failures, 0)
        image.withUnsafeBytes { XCTAssertEqual(memcmp(r.pointer, $0.baseAddress! + at, len), 0, "wrong bytes") }
    }
}
