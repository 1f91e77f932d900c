import CUffd
import Dispatch
import Foundation
import Synchronization
import SystemPackage
import XCTest
@testable import UffdKit

private struct SourceBroke: Error, CustomStringConvertible {
    let offset: Int
    var description: String { "source broke at offset \(offset)" }
}

/// A deferred source over pattern bytes in memory. `immediate` finishes each request on
/// another thread; `hold` keeps requests for the test to finish.
private final class TestSource: DeferredSource, @unchecked Sendable {
    enum Mode { case immediate, hold }
    let length: Int
    let chunkSize: Int
    let data: UnsafeMutableRawPointer
    let mode: Mutex<Mode>
    let held = Mutex<[(offset: Int, length: Int, fetch: DeferredFetch)]>([])
    let requests = Atomic<Int>(0)
    /// Chunks at or after this offset fail; the chunk at `shortAt` is delivered one byte short.
    let failFrom: Int?
    let shortAt: Int?

    init(length: Int, chunkSize: Int, mode: Mode, failFrom: Int? = nil, shortAt: Int? = nil) {
        self.length = length
        self.chunkSize = chunkSize
        self.mode = Mutex(mode)
        self.failFrom = failFrom
        self.shortAt = shortAt
        data = .allocate(byteCount: length, alignment: 4096)
        fillPattern(data, length, seed: 11)
    }

    deinit { data.deallocate() }

    func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        requests.add(1, ordering: .relaxed)
        if mode.withLock({ $0 }) == .hold {
            held.withLock { $0.append((offset, length, fetch)) }
            return
        }
        DispatchQueue.global().async { _ = self.finish(offset, length, fetch) }
    }

    func finish(_ offset: Int, _ length: Int, _ f: DeferredFetch) -> DeferredOutcome {
        if let failFrom, offset >= failFrom { return f.fail(SourceBroke(offset: offset)) }
        let n = offset == shortAt ? length - 1 : length
        return f.deliver(UnsafeRawBufferPointer(start: data + offset, count: n))
    }

    /// Finishes every held request now.
    func finishHeld() -> [DeferredOutcome] {
        held.withLock { h in defer { h = [] }; return h }.map { finish($0.offset, $0.length, $0.fetch) }
    }
}

private let readSink = Atomic<Int>(0)

/// Reads the byte at `addr` (a load the optimizer cannot drop). Shared by the deferred tests.
@inline(never)
func readByte(_ addr: UInt) -> UInt8 {
    let v = UnsafePointer<UInt8>(bitPattern: addr)!.pointee
    readSink.add(Int(v), ordering: .relaxed)
    return v
}

/// Waits (bounded) until `cond` holds. Shared by the deferred tests.
func eventually(_ seconds: Double = 10, _ cond: () -> Bool) -> Bool {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if cond() { return true }
        usleep(1000)
    }
    return cond()
}

/// Deferred resolution through FaultHandler: a policy answers "not yet", the bytes arrive on
/// another thread, faults on a chunk in flight join it; deadline, stop, failing sources, EEXIST.
final class DeferredResolutionTests: XCTestCase {
    let page = basePageSize
    var chunk: Int { 4 * page }

    private func session(_ r: MappedRegion, _ src: TestSource, configure: (inout FaultHandler.Options) -> Void = { _ in })
        throws -> Session {
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        configure(&o)
        return try Session(r, options: o) { _ in DeferredCopyPolicy(destination: r.address, source: src) }
    }

    /// Four threads fault on four pages of one chunk: one request, three joins, one COPY wakes
    /// them all; then the whole region is served with every byte right.
    func testFaultsOnAChunkInFlightJoinOneFetch() throws {
        let len = 16 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = TestSource(length: len, chunkSize: chunk, mode: .hold)
        let s = try session(r, src)
        let base = r.address, page = self.page, chunk = self.chunk
        let finished = s.run(30) {
            let group = DispatchGroup()
            for i in 0..<4 {
                Thread.detachNewThread {
                    group.enter()
                    _ = readByte(base + UInt(i * page + 17))
                    group.leave()
                }
            }
            XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 3 }, "the other faults did not join")
            XCTAssertEqual(src.requests.load(ordering: .relaxed), 1, "single flight: one request for the chunk")
            XCTAssertEqual(src.finishHeld(), [.resolved])
            XCTAssertEqual(group.wait(timeout: .now() + 10), .success, "a joined thread was not woken")
            src.mode.withLock { $0 = .immediate }
            _ = touch(base, length: len, threads: 4)
            XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, len), 0, "wrong bytes")
            _ = chunk
        }
        XCTAssertTrue(finished)
        let st = s.finish()
        XCTAssertEqual(st.deferredFetches, 16)
        XCTAssertEqual(st.deferredResolved, 16)
        XCTAssertEqual(st.latency.totalCount, 16, "one latency sample per fetch")
        XCTAssertEqual(st.bytes, UInt64(len))
        XCTAssertEqual(st.resolutions[.deferred], st.faults)
        XCTAssertEqual(st.fallbacks + st.failures, 0)
        XCTAssertTrue(s.handler.failures().isEmpty)
    }

    /// A fetch that never finishes: at the deadline the fallback (zeros here) releases the
    /// thread, the owner gets an ETIMEDOUT failure, and the late delivery is refused.
    func testFetchMissingItsDeadlineGetsTheFallbackAndAnError() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * chunk)
        let src = TestSource(length: 4 * chunk, chunkSize: chunk, mode: .hold)
        let s = try session(r, src) { $0.deferredDeadline = .milliseconds(200) }
        let base = r.address
        let finished = s.run(30) {
            XCTAssertEqual(UnsafePointer<UInt8>(bitPattern: base + 5)!.pointee, 0, "the fallback was not applied")
        }
        XCTAssertTrue(finished)
        XCTAssertEqual(src.finishHeld(), [.expired], "a late delivery must be refused")
        // The thread is released before the reader reports the expiry: stop first.
        let st = s.finish()
        let f = s.handler.failures()
        XCTAssertEqual(f.count, 1)
        XCTAssertEqual(f.first?.errno, .timedOut)
        XCTAssertEqual(f.first?.resolution.operation, .deferred)
        XCTAssertEqual(f.first?.fault.address, base)
        XCTAssertEqual(f.first?.recoveredByFallback, true)
        XCTAssertEqual(st.deferredExpired, 1)
        XCTAssertEqual(st.deferredLate, 1)
        XCTAssertEqual(st.fallbacks, 1)
    }

    /// A source that fails mid-way (and delivers one chunk short): those chunks get the
    /// fallback (zeros), never wrong bytes; each failure reaches the owner with the source's
    /// error; the chunks before are served.
    func testSourceFailingMidwayGetsTheFallbackPerChunk() throws {
        let len = 8 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = TestSource(length: len, chunkSize: chunk, mode: .immediate, failFrom: 5 * chunk, shortAt: 2 * chunk)
        let s = try session(r, src)
        let base = r.address, chunk = self.chunk
        let finished = s.run(30) {
            _ = touch(base, length: len, threads: 2)
            for c in 0..<8 {
                let p = UnsafeRawPointer(bitPattern: base + UInt(c * chunk))!
                if c == 2 || c >= 5 {
                    XCTAssertEqual(wordSum(p, chunk), 0, "chunk \(c) must read zeros (fallback)")
                } else {
                    XCTAssertEqual(memcmp(p, src.data + c * chunk, chunk), 0, "chunk \(c) wrong")
                }
            }
        }
        XCTAssertTrue(finished)
        // A delivering thread reports after it released the faulting threads: wait for it.
        XCTAssertTrue(eventually { s.handler.failures().count >= 4 })
        let f = s.handler.failures()
        XCTAssertEqual(f.count, 4)
        XCTAssertEqual(f.filter { $0.policyError is SourceBroke }.count, 3)
        XCTAssertEqual(f.filter { $0.errno == .invalidArgument }.count, 1, "the short delivery")
        XCTAssertTrue(f.allSatisfy { $0.recoveredByFallback })
        let st = s.finish()
        XCTAssertEqual(st.deferredResolved, 4)
        XCTAssertEqual(st.fallbacks, 4)
    }

    /// stop() with a fetch in flight: the range is woken (the thread re-faults and waits in the
    /// queue), the late delivery is refused; the next run serves the fault again.
    func testStopWithAFetchInFlightHandsTheFaultToTheNextRun() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * chunk)
        let src = TestSource(length: 4 * chunk, chunkSize: chunk, mode: .hold)
        let s = try session(r, src)
        let base = r.address
        let done = Atomic<Bool>(false)
        let finished = s.run(30) {
            let t = Thread {
                _ = readByte(base + 9)
                done.store(true, ordering: .releasing)
            }
            t.start()
            XCTAssertTrue(eventually { src.requests.load(ordering: .relaxed) == 1 })
            s.handler.stop()
            XCTAssertEqual(s.handler.stats().deferredCancelled, 1)
            XCTAssertEqual(src.finishHeld(), [.cancelled], "a delivery after stop must be refused")
            usleep(100_000)
            XCTAssertFalse(done.load(ordering: .acquiring), "the thread re-faults and waits for a handler")
            src.mode.withLock { $0 = .immediate }
            do { try s.handler.start() } catch { XCTFail("restart: \(error)") }
            XCTAssertTrue(eventually { done.load(ordering: .acquiring) }, "the next run did not serve the fault")
        }
        XCTAssertTrue(finished)
        XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, chunk), 0)
        let st = s.finish()
        XCTAssertEqual(st.deferredFetches, 2)
        XCTAssertEqual(st.deferredResolved, 1)
    }

    /// A page of the chunk was filled by someone else while the fetch was in flight: the
    /// delivery meets EEXIST there, keeps that page, copies the rest, wakes the waiter, and
    /// counts it (a whole-chunk COPY again would stop at that page on every re-fault).
    func testDeliveryMeetingEEXISTWakesAndCounts() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * chunk)
        let src = TestSource(length: 4 * chunk, chunkSize: chunk, mode: .hold)
        let s = try session(r, src)
        let base = r.address, page = self.page
        let finished = s.run(30) {
            let woke = Atomic<Bool>(false)
            let t = Thread {
                _ = readByte(base + UInt(2 * page))
                woke.store(true, ordering: .releasing)
            }
            t.start()
            XCTAssertTrue(eventually { src.requests.load(ordering: .relaxed) == 1 })
            let other = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: page)
            memset(other, 0x5a, page)
            do { try s.uffd.copy(to: base, from: UInt(bitPattern: other), length: page) } catch { XCTFail("copy: \(error)") }
            other.deallocate()
            src.mode.withLock { $0 = .immediate }
            XCTAssertEqual(src.finishHeld(), [.existed])
            XCTAssertTrue(eventually { woke.load(ordering: .acquiring) }, "the waiting thread was not woken")
            XCTAssertEqual(src.requests.load(ordering: .relaxed), 1, "\(s.handler.stats())")
        }
        XCTAssertTrue(finished)
        usleep(50_000)
        let st = s.finish()
        XCTAssertEqual(st.existed, 1)
        XCTAssertEqual(st.bytes, UInt64(chunk - page))
        XCTAssertEqual(UnsafePointer<UInt8>(bitPattern: base)!.pointee, 0x5a, "the page filled first stays")
        let rest = UnsafeRawPointer(bitPattern: base + UInt(page))!
        XCTAssertEqual(memcmp(rest, src.data + page, chunk - page), 0, "the rest of the chunk")
    }

    /// Single flight holds across readers: with two readers the faults on one chunk still
    /// make one request.
    func testSingleFlightAcrossTwoReaders() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * chunk)
        let src = TestSource(length: 4 * chunk, chunkSize: chunk, mode: .hold)
        let s = try session(r, src) { $0.readers = 2 }
        let base = r.address, page = self.page
        let finished = s.run(30) {
            let group = DispatchGroup()
            for i in 0..<4 {
                group.enter()
                Thread.detachNewThread {
                    _ = readByte(base + UInt(i * page))
                    group.leave()
                }
            }
            XCTAssertTrue(eventually { s.handler.stats().deferredJoined == 3 })
            XCTAssertEqual(src.finishHeld(), [.resolved])
            XCTAssertEqual(group.wait(timeout: .now() + 10), .success)
        }
        XCTAssertTrue(finished)
        XCTAssertEqual(src.requests.load(ordering: .relaxed), 1)
        XCTAssertEqual(s.finish().deferredFetches, 1)
    }

    /// A delivery while an event is unread (a REMOVE queued behind a reader that is busy) meets
    /// EAGAIN: it waits for the reader to drain the event and then completes; nothing is lost.
    func testDeliveryMeetingEAGAINWaitsForTheEventToBeDrained() throws {
        try require([.eventRemove])
        let len = 8 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        let src = TestSource(length: len, chunkSize: chunk, mode: .hold)
        /// Defers chunk 0..5; a fault in chunk 7 blocks the (single) reader until released.
        final class Gate: FaultPolicy, @unchecked Sendable {
            let inner: DeferredCopyPolicy
            let blocker: UInt
            let entered = Atomic<Bool>(false)
            let release = DispatchSemaphore(value: 0)
            init(_ inner: DeferredCopyPolicy, blocker: UInt) { self.inner = inner; self.blocker = blocker }
            func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
                if fault.address >= blocker {
                    // Only the first time: its ZEROPAGE meets EAGAIN too, and the retry is
                    // decided again.
                    if !entered.exchange(true, ordering: .acquiringAndReleasing) { _ = release.wait(timeout: .now() + 20) }
                    return .zeropage()
                }
                return try inner.resolve(fault, context: context)
            }
        }
        let gate = Gate(DeferredCopyPolicy(destination: r.address, source: src), blocker: r.address + UInt(7 * chunk))
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, features: [.eventRemove], options: o) { _ in gate }
        let base = r.address, chunk = self.chunk
        // A populated page for MADV_DONTNEED to remove (the REMOVE event).
        let filler = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { filler.deallocate() }
        memset(filler, 7, chunk)
        _ = try s.uffd.copy(to: base + UInt(6 * chunk), from: UInt(bitPattern: filler), length: chunk)
        let outcome = Mutex<DeferredOutcome?>(nil)
        let finished = s.run(30) {
            let waiter = Atomic<Bool>(false)
            Thread.detachNewThread {
                _ = readByte(base + 3)
                waiter.store(true, ordering: .releasing)
            }
            XCTAssertTrue(eventually { src.requests.load(ordering: .relaxed) == 1 })
            Thread.detachNewThread { _ = readByte(base + UInt(7 * chunk)) }
            XCTAssertTrue(eventually { gate.entered.load(ordering: .acquiring) }, "the reader is not busy")
            let removed = Atomic<Bool>(false)
            Thread.detachNewThread {
                madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(6 * chunk)), chunk, MADV_DONTNEED)
                removed.store(true, ordering: .releasing)
            }
            usleep(200_000) // the REMOVE is queued and unread: the mm is "changing"
            XCTAssertFalse(removed.load(ordering: .acquiring), "MADV_DONTNEED should wait for its event to be read")
            let delivered = Atomic<Bool>(false)
            Thread.detachNewThread {
                let o = src.finishHeld().first
                outcome.withLock { $0 = o }
                delivered.store(true, ordering: .releasing)
            }
            usleep(100_000)
            XCTAssertFalse(delivered.load(ordering: .acquiring), "the delivery should wait for the event to be drained")
            gate.release.signal()
            XCTAssertTrue(eventually { delivered.load(ordering: .acquiring) && removed.load(ordering: .acquiring) })
            XCTAssertTrue(eventually { waiter.load(ordering: .acquiring) }, "the waiting thread was not woken")
        }
        XCTAssertTrue(finished)
        XCTAssertEqual(outcome.withLock { $0 }, .resolved)
        XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, chunk), 0)
        let st = s.finish()
        // One for the delivery's wait, one or more for the blocker's ZEROPAGE kept by the loop.
        XCTAssertGreaterThanOrEqual(st.retries, 2, "EAGAIN was not met: the race was not exercised")
        XCTAssertEqual(st.removeEvents, 1)
    }

    /// deferFill outside a handler (no table) is refused with a clear error, not a crash.
    func testDeferFillOutsideAHandlerIsRefused() {
        let ctx = FaultContext(fd: -1, features: [])
        XCTAssertThrowsError(try ctx.deferFill(0x10000, length: page)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .notSupported)
        }
    }
}

/// Records the failures the handler tells its policy about (``FaultPolicy/failed``).
private struct FailureRecordingPolicy: FaultPolicy {
    let inner: DeferredCopyPolicy
    let calls = Box<[(op: Resolution.Operation, errno: Errno, reader: Int, start: UInt, length: Int)]>([])
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        try inner.resolve(fault, context: context)
    }
    func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        let entry = (op: resolution.operation, errno: errno, reader: context.reader, start: resolution.start,
                     length: resolution.length)
        calls.update { $0.append(entry) }
    }
}

/// Follow-ups: the failure hook for deferred outcomes, the deferred path on hugetlb.
final class DeferredFollowUpTests: XCTestCase {
    /// A fetch failed by the source (on its own thread) reaches the policy's `failed` like a
    /// failure on the reader does, once, before the owner hears of it; so does an expiry.
    func testDeferredFailuresReachThePolicyFailedHook() throws {
        let chunk = 4 * basePageSize, len = 4 * chunk
        let r = try MappedRegion(.anonymous(), length: len)
        // Chunk 0 fails on the source's thread; chunk 1 is held until its deadline passes.
        let failing = TestSource(length: len, chunkSize: chunk, mode: .immediate, failFrom: 0)
        let policy = FailureRecordingPolicy(inner: DeferredCopyPolicy(destination: r.address, source: failing))
        let base = r.address
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        o.deferredDeadline = .milliseconds(300)
        let s = try Session(r, options: o) { _ in policy }
        XCTAssertTrue(s.run(30) { XCTAssertEqual(readByte(base + 3), 0, "the fallback was not applied") })
        XCTAssertTrue(eventually { policy.calls.value.count == 1 }, "failed() was not called for the source's failure")
        let first = policy.calls.value.first
        XCTAssertEqual(first?.op, .fail)
        XCTAssertEqual(first?.start, base)
        XCTAssertEqual(first?.length, chunk)
        XCTAssertEqual(first?.errno, .ioError)
        XCTAssertEqual(first?.reader, -1, "a source-side failure is not on a reader")
        // An expiry (reader-side) calls it as well.
        failing.mode.withLock { $0 = .hold }
        XCTAssertTrue(s.run(30) { XCTAssertEqual(readByte(base + UInt(chunk) + 3), 0, "the fallback was not applied") })
        _ = s.finish()
        let calls = policy.calls.value
        XCTAssertEqual(calls.count, 2, "\(calls)")
        XCTAssertEqual(calls.last?.op, .deferred)
        XCTAssertEqual(calls.last?.errno, .timedOut)
        XCTAssertEqual(s.handler.failures().count, 2)
        XCTAssertEqual(failing.finishHeld(), [.expired])
    }

    /// Deferred fetches of huge pages: chunks of one huge page are copied in whole; chunks the
    /// source fails get the fallback over the whole huge page (zeros are copied: hugetlb has no
    /// zero page).
    func testDeferredFetchesOnHugetlb() throws {
        try require([.missingHugetlbfs])
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 4 * huge
        var ran = false
        let ok = try withHugePages(len / huge + 1) {
            ran = true
            let r: MappedRegion
            do {
                r = try MappedRegion(.hugetlb, length: len)
            } catch let error as UffdError where error.errno == .noMemory {
                // Another process took the free huge pages between the reservation and the map.
                throw XCTSkip("huge pages reserved but taken before the map (shared machine): \(error)")
            }
            // The last two huge pages fail at the source.
            let src = TestSource(length: len, chunkSize: huge, mode: .immediate, failFrom: 2 * huge)
            var o = FaultHandler.Options()
            o.fallback = .zeroFill
            let s = try Session(r, options: o) { _ in
                DeferredCopyPolicy(destination: r.address, source: src, pageSize: huge)
            }
            let base = r.address
            // One thread: each chunk faults once (with several, a fault read after its chunk was
            // filled claims a second fetch, which ends in EEXIST).
            XCTAssertTrue(s.run(60) { _ = touch(base, length: len, threads: 1) })
            let st = s.finish()
            XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: base)!, src.data, 2 * huge), 0, "wrong bytes in the delivered huge pages")
            let tail = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: base + UInt(2 * huge))!, count: 2 * huge)
            XCTAssertTrue(tail.allSatisfy { $0 == 0 }, "the failed huge pages do not read zeros")
            XCTAssertEqual(st.deferredFetches, 4, "\(st)")
            XCTAssertEqual(st.deferredResolved, 2, "\(st)")
            XCTAssertEqual(st.fallbacks, 2, "\(st)")
            XCTAssertEqual(st.failures, 0, "\(st)")
            XCTAssertEqual(s.handler.failures().count, 2)
        }
        if !ok { throw XCTSkip("cannot reserve \(len / huge + 1) huge pages (vm.nr_hugepages)") }
        XCTAssertTrue(ran)
    }
}
