import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// The registered memory changes while faults are in flight: munmap, MADV_DONTNEED, mremap.
/// A slow policy (a sleep per fault) keeps faults queued while the change happens.
final class RegionChangeTests: XCTestCase {
    let pages = 32

    /// A CopyPolicy over a PatternSource that sleeps `micros` before each answer.
    func slowCopy(start: UInt, length: Int, micros: UInt32) -> ClosurePolicy {
        let copy = CopyPolicy(start: start, length: length, source: PatternSource(length: length))
        return ClosurePolicy(inner: copy) { f, ctx in
            usleep(micros)
            return try copy.resolve(f, context: ctx)
        }
    }

    /// Decided: threads blocked on pages that get unmapped are released (the handler's COPY
    /// finds no VMA: ENOENT → `gone`, and the waiters are woken, or the fault was resolved
    /// before the unmap; with EVENT_UNMAP a fault decided after the event is on memory the
    /// policy's range no longer holds: its gone answer meets no VMA either); a thread that then
    /// retries the access gets SIGSEGV, as for any access to unmapped memory. The handler keeps
    /// running and reports no failure.
    ///
    /// The hole is held by a PROT_NONE mapping placed right after munmap returns, so no other
    /// mapping of this process (the sanitizer's allocator, a thread stack) can land there later
    /// and hand a woken thread its bytes instead of SIGSEGV; should one have taken it in the
    /// instant before, the attempt proves nothing and is run again (``attempts(_:_:)``). The kernel treats it as unmapped
    /// memory for both sides: the handler's ioctls find no registered VMA (ENOENT → `gone`), a
    /// retried access faults (SIGSEGV). Right after munmap, not after the policy has handled
    /// the UNMAP event: munmap returns only once the handler has read the event, and waiting
    /// longer would only widen the window in which another mapping can take the hole.
    func munmapInFlight(features: Features) throws {
        try attempts("munmap features=\(features)") { try munmapInFlightAttempt(features: features) }
    }

    /// One run of ``munmapInFlight(features:)``; false (nothing asserted on the pages) when
    /// another mapping took the hole before the test could hold it.
    func munmapInFlightAttempt(features: Features) throws -> Bool {
        let ps = basePageSize, len = pages * ps
        let base = rawAnon(len)
        let uffd = try Userfaultfd(features: features)
        try uffd.register(base, length: len, modes: .missing)
        let h = FaultHandler(uffd: uffd, policy: slowCopy(start: base, length: len, micros: 4_000), options: options(.zeroFill))
        try h.start()
        let done = DispatchSemaphore(value: 0)
        let pageCount = pages
        let results = Locked<[Int: Access]?>(nil)
        spawn {
            let r = readPages(base, Array(0..<pageCount), pageSize: ps, threads: 8, timeout: 20)
            results.withLock { $0 = r }
            done.signal()
        }
        usleep(60_000) // some faults resolved, most queued
        XCTAssertEqual(munmap(UnsafeMutableRawPointer(bitPattern: base), len), 0)
        let hold = holdHole(base, len)
        defer { if let hold { munmap(hold, len) } }
        XCTAssertTrue(waitFor(done, 25), "a thread is still blocked after the unmap")
        h.stop()
        guard hold != nil else { return false }
        let got = results.withLock { $0 }
        assertPages(got, Array(0..<pages)) { p in
            got?[p] == .sigsegv ? .sigsegv : .value(patternWord(p))
        }
        let st = h.stats()
        let segv = got?.values.filter { $0 == .sigsegv }.count ?? 0
        XCTAssertGreaterThan(segv, 0, "the unmap came after every fault: the test did not race")
        XCTAssertEqual(st.failures, 0, "\(h.failures().prefix(3))")
        if features.contains(.eventUnmap) { XCTAssertEqual(st.unmapEvents, 1, "\(st)") }
        report("munmap features=\(features) sigsegv=\(segv) gone=\(st.gone) fallbacks=\(st.fallbacks) resolved=\(st.resolutions[.copy] ?? 0)")
        return true
    }

    /// Runs `attempt` until it could hold its hole (at most 3 times): an attempt whose hole
    /// another mapping took first (the sanitizer's allocator, mapping on another thread in the
    /// instant between munmap and the hold) says nothing either way and is run again.
    func attempts(_ what: String, _ attempt: () throws -> Bool) throws {
        for n in 1...3 {
            if try attempt() { return }
            report("\(what): attempt \(n): another mapping took the unmapped hole before the test held it; running again")
        }
        XCTFail("\(what): in 3 attempts another mapping always took the unmapped hole before the test could hold it")
    }

    /// Holds the unmapped `[base, base+len)` with a PROT_NONE mapping (accesses: SIGSEGV; the
    /// handler's ioctls: no registered VMA, ENOENT). nil when another mapping took (part of) the
    /// hole first: what a woken thread reads there is then not ours to assert.
    func holdHole(_ base: UInt, _ len: Int) -> UnsafeMutableRawPointer? {
        let want = UnsafeMutableRawPointer(bitPattern: base)
        let p = mmap(want, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        guard let p, p != MAP_FAILED else { return nil }
        guard p == want else { munmap(p, len); return nil }
        return p
    }

    /// Decided, and made deterministic: a fault read before an UNMAP event and decided after
    /// the policy followed it (its range no longer holds the page) is `gone`, not a policy
    /// failure; its thread is woken and its retry gets SIGSEGV. One reader holds the fault in
    /// the policy while the other reads the event. Before: "outside the policy's range", a
    /// failure and a fallback.
    func testFaultDecidedAfterItsUnmapIsGone() throws {
        try isolated {
            try requireFeatures([.eventUnmap])
            try attempts("fault decided after its unmap") { try faultDecidedAfterItsUnmapAttempt() }
        }
    }

    /// One run of ``testFaultDecidedAfterItsUnmapIsGone()``; false when the hole was taken.
    func faultDecidedAfterItsUnmapAttempt() throws -> Bool {
        let ps = basePageSize, len = pages * ps, page = 5
        let base = rawAnon(len)
        let uffd = try Userfaultfd(features: [.eventUnmap])
        try uffd.register(base, length: len, modes: .missing)
        let copy = CopyPolicy(start: base, length: len, source: PatternSource(length: len))
        let entered = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0)
        let policy = ClosurePolicy(inner: copy) { f, ctx in
            entered.signal()
            _ = proceed.wait(timeout: .now() + 20) // watchdog: never holds the reader for good
            return try copy.resolve(f, context: ctx)
        }
        let h = FaultHandler(uffd: uffd, policy: policy, options: options(.zeroFill, readers: 2, batch: 1))
        try h.start()
        let done = DispatchSemaphore(value: 0)
        let access = Locked<Int32>(-1)
        spawn {
            var v: UInt64 = 0
            let rc = rel_read_u64(UnsafePointer<UInt64>(bitPattern: base + UInt(page * ps))!, &v)
            access.withLock { $0 = rc }
            done.signal()
        }
        XCTAssertTrue(waitFor(entered, 10), "the fault never reached the policy")
        // Returns once the other reader has read the UNMAP event.
        XCTAssertEqual(munmap(UnsafeMutableRawPointer(bitPattern: base), len), 0)
        let hold = holdHole(base, len)
        defer { if let hold { munmap(hold, len) } }
        guard hold != nil else {
            proceed.signal()
            XCTAssertTrue(waitFor(done, 20), "the faulting thread is still blocked")
            h.stop()
            return false
        }
        let deadline = Date().addingTimeInterval(10)
        while copy.range.contains(base), Date() < deadline { usleep(1_000) }
        XCTAssertFalse(copy.range.contains(base), "the policy did not follow the UNMAP event")
        proceed.signal()
        XCTAssertTrue(waitFor(done, 20), "the faulting thread is still blocked")
        h.stop()
        XCTAssertEqual(access.withLock { $0 }, Int32(REL_ACCESS_SIGSEGV.rawValue), "the retry did not get SIGSEGV")
        let st = h.stats()
        XCTAssertEqual(st.failures + st.fallbacks, 0, "\(h.failures().prefix(3))")
        XCTAssertEqual(st.gone, 1, "\(st)")
        XCTAssertEqual(st.unmapEvents, 1, "\(st)")
        return true
    }

    func testMunmapWhileFaultsInFlight() throws {
        try isolated { try munmapInFlight(features: []) }
    }

    func testMunmapWhileFaultsInFlightWithUnmapEvents() throws {
        try isolated { try munmapInFlight(features: [.eventUnmap]) }
    }

    /// Decided: pages dropped by MADV_DONTNEED while faults are in flight fault again and are
    /// copied again from the source (EAGAIN while a REMOVE event is unread is retried after
    /// draining). Every read sees the source's data; nothing fails.
    func dontneedInFlight(features: Features) throws {
        let ps = basePageSize, len = pages * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let (_, h) = try startHandler(r, features: features, options: options(.poison, readers: 2)) { _ in
            slowCopy(start: r.address, length: len, micros: 200)
        }
        let stop = Atomic<Bool>(false)
        let pageCount = pages
        let done = DispatchSemaphore(value: 0)
        let bad = Locked<[String]>([])
        let reads = Atomic<Int>(0)
        for t in 0..<4 {
            spawn {
                var i = t
                while !stop.load(ordering: .relaxed) {
                    let p = i % pageCount
                    var v: UInt64 = 0
                    let rc = rel_read_u64(UnsafePointer<UInt64>(bitPattern: r.address + UInt(p * ps))!, &v)
                    if rc != 0 || v != patternWord(p) { bad.withLock { $0.append("page \(p): rc \(rc) value \(v)") } }
                    reads.add(1, ordering: .relaxed)
                    i += 7
                }
                done.signal()
            }
        }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let first = Int.random(in: 0..<pages, using: &rng)
            let n = Int.random(in: 1...(pages - first), using: &rng)
            XCTAssertEqual(madvise(r.pointer + first * ps, n * ps, MADV_DONTNEED), 0)
            usleep(500)
        }
        stop.store(true, ordering: .relaxed)
        var finished = 0
        for _ in 0..<4 where waitFor(done, 10) { finished += 1 }
        XCTAssertEqual(finished, 4, "a reading thread is blocked")
        h.stop()
        let st = h.stats()
        XCTAssertEqual(bad.withLock { $0.prefix(5) }, [])
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(h.failures().prefix(3))")
        XCTAssertGreaterThan(st.missingFaults, UInt64(pages), "pages were not faulted again after MADV_DONTNEED")
        if features.contains(.eventRemove) { XCTAssertGreaterThan(st.removeEvents, 0) }
        report("dontneed features=\(features) reads=\(reads.load(ordering: .relaxed)) faults=\(st.missingFaults) retries=\(st.retries) removeEvents=\(st.removeEvents) existed=\(st.existed)")
    }

    func testDontneedWhileFaultsInFlight() throws {
        try isolated { try dontneedInFlight(features: []) }
    }

    func testDontneedWhileFaultsInFlightWithRemoveEvents() throws {
        try isolated { try dontneedInFlight(features: [.eventRemove]) }
    }

    /// Decided: with EVENT_REMAP the policy follows the move (CopyPolicy updates its start);
    /// every page read through the new address has the source's data. A thread still using
    /// the old address gets SIGSEGV (as without userfaultfd); a fault queued at the old address
    /// is answered (its COPY finds no VMA; decided after the REMAP event, the policy's range
    /// remembers the old address as gone and its ZEROPAGE finds no VMA: `gone` either way, no
    /// failure, no fallback) and its thread woken. Nothing blocks.
    func testMremapWhileFaultsInFlight() throws {
        try isolated {
            try requireFeatures([.eventRemap])
            let ps = basePageSize, len = pages * ps
            let old = rawAnon(len)
            let target = rawAnon(len) // an address range to move to
            let uffd = try Userfaultfd(features: [.eventRemap])
            try uffd.register(old, length: len, modes: .missing)
            let copy = CopyPolicy(start: old, length: len, source: PatternSource(length: len))
            let policy = ClosurePolicy(inner: copy) { f, ctx in
                usleep(5_000)
                return try copy.resolve(f, context: ctx)
            }
            let h = FaultHandler(uffd: uffd, policy: policy, options: options(.zeroFill))
            try h.start()
            let current = Atomic<UInt>(old)
            let pageCount = pages
            let done = DispatchSemaphore(value: 0)
            let seen = Locked<[String]>([])
            for t in 0..<4 {
                spawn {
                    for p in stride(from: t, to: pageCount, by: 4) {
                        let base = current.load(ordering: .acquiring)
                        var v: UInt64 = 0
                        let rc = rel_read_u64(UnsafePointer<UInt64>(bitPattern: base + UInt(p * ps))!, &v)
                        // Through the old address after the move: SIGSEGV (or a fallback zero page
                        // mapped just before). Otherwise the source's data.
                        if rc == Int32(REL_ACCESS_OK.rawValue), v != patternWord(p), v != 0 || base != old {
                            seen.withLock { $0.append("page \(p) via \(base == old ? "old" : "new"): \(v)") }
                        }
                    }
                    done.signal()
                }
            }
            usleep(30_000)
            XCTAssertEqual(cuffd_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), UInt64(len),
                                              UnsafeMutableRawPointer(bitPattern: target)), 0)
            current.store(target, ordering: .releasing)
            var finished = 0
            for _ in 0..<4 where waitFor(done, 20) { finished += 1 }
            XCTAssertEqual(finished, 4, "a thread is blocked after the mremap")
            XCTAssertEqual(copy.range.start, target, "the policy did not follow the remap")
            // Everything not yet populated faults at the new address and gets the right page.
            let after = readPages(target, Array(0..<pages), pageSize: ps, threads: 2)
            h.stop()
            XCTAssertEqual(seen.withLock { $0 }, [])
            assertPages(after, Array(0..<pages)) { p in
                // A page zero-filled by the fallback at the old address before the move keeps its zeros.
                after?[p] == .value(0) ? .value(0) : .value(patternWord(p))
            }
            let zeros = after?.values.filter { $0 == .value(0) }.count ?? 0
            XCTAssertLessThanOrEqual(zeros, h.stats().fallbacks == 0 ? 0 : pages)
            XCTAssertEqual(h.stats().remapEvents, 1)
            XCTAssertEqual(h.stats().fallbacks + h.stats().failures, 0, "\(h.failures().prefix(3))")
            report("mremap remapEvents=\(h.stats().remapEvents) fallbacks=\(h.stats().fallbacks) gone=\(h.stats().gone) zeroPagesAfter=\(zeros)")
        }
    }
}
