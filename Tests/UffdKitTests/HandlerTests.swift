import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import SystemPackage
import XCTest
@testable import UffdKit

/// Records the events a policy sees, then delegates.
final class EventRecorder: FaultPolicy {
    let inner: any FaultPolicy
    let events = Mutex<[String]>([])
    /// The forked child's fd's `userModeOnly`, once a fork was seen.
    let childUserModeOnly = Mutex<Bool?>(nil)
    init(_ inner: any FaultPolicy) { self.inner = inner }
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        try inner.resolve(fault, context: context)
    }
    func handle(event: Event, context: borrowing FaultContext) {
        let s: String
        switch event {
        case .fork(let child):
            s = "fork"
            childUserModeOnly.withLock { $0 = child.userModeOnly }
        case .remap(let f, let t, let l): s = "remap \(f) \(t) \(l)"
        case .remove(let a, let b): s = "remove \(a) \(b)"
        case .unmap(let a, let b): s = "unmap \(a) \(b)"
        case .unknown(let e): s = "unknown \(e)"
        }
        events.withLock { $0.append(s) }
        inner.handle(event: event, context: context)
    }
    var scratchBytes: Int { inner.scratchBytes }
}

/// Throws for selected pages (optionally only the first time each), copies a pattern otherwise.
final class ThrowingPolicy: FaultPolicy {
    struct Refused: Error, CustomStringConvertible { let page: UInt; var description: String { "refused \(page)" } }
    let copy: CopyPolicy
    let bad: Set<UInt>
    let onlyOnce: Bool
    let thrown = Mutex<Set<UInt>>([])
    init(copy: CopyPolicy, bad: Set<UInt>, onlyOnce: Bool = false) {
        self.copy = copy
        self.bad = bad
        self.onlyOnce = onlyOnce
    }
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if bad.contains(fault.address) {
            let first = thrown.withLock { $0.insert(fault.address).inserted }
            if first || !onlyOnce { throw Refused(page: fault.address) }
        }
        return try copy.resolve(fault, context: context)
    }
    var scratchBytes: Int { copy.scratchBytes }
}

final class HandlerTests: XCTestCase {
    let ps = basePageSize

    // MARK: Events

    /// The kernel gives a forked child's fd the parent's flags: a kernel-faults parent has a
    /// kernel-faults child, and the child's `Userfaultfd` says so.
    func testForkedChildFdKeepsTheParentsUserModeOnlySetting() throws {
        try require([.eventFork])
        let uffd: Userfaultfd
        do {
            uffd = try Userfaultfd(features: [.eventFork], options: [.nonBlocking, .kernelFaults])
        } catch {
            throw XCTSkip("kernel faults are not allowed for this user: \(error)")
        }
        XCTAssertFalse(uffd.userModeOnly)
        let len = 1 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        try uffd.register(r, modes: .missing)
        let rec = EventRecorder(ZeroFillPolicy(region: r))
        let handler = FaultHandler(uffd: uffd, policy: rec)
        try handler.start()
        let base = r.address, ps = self.ps
        let result = Box<Int32>(-1)
        let finished = withWatchdog(30, onTimeout: { uffd.close(); handler.stop() }) {
            var sum: UInt64 = 0
            let rc = cuffd_fork_and_sum(UnsafeRawPointer(bitPattern: base), UInt64(len), UInt64(ps), 20_000, &sum)
            result.update { $0 = rc }
        }
        handler.stop()
        uffd.close()
        XCTAssertTrue(finished)
        XCTAssertEqual(result.value, 0)
        XCTAssertEqual(rec.childUserModeOnly.withLock { $0 }, false)
    }

    func testForkEventServesTheChildWithTheSamePolicy() throws {
        try require([.eventFork])
        let len = 16 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        let src = PatternSource(length: len, seed: 40)
        let rec = EventRecorder(CopyPolicy(region: r, source: src))
        let s = try Session(r, features: [.eventFork]) { _ in rec }
        let base = r.address, ps = self.ps
        let result = Box<(Int32, UInt64)>((0, 0))
        s.run {
            var sum: UInt64 = 0
            // fork() waits until the handler read the event; the child then faults on its own
            // registered copy, served by the child's handler.
            let rc = cuffd_fork_and_sum(UnsafeRawPointer(bitPattern: base), UInt64(len), UInt64(ps), 20_000, &sum)
            result.update { $0 = (rc, sum) }
        }
        let st = s.finish()
        XCTAssertEqual(result.value.0, 0)
        var expected: UInt64 = 0
        for off in stride(from: 0, to: len, by: ps) { expected &+= PatternSource.word(at: off, seed: 40) & 0xFF }
        XCTAssertEqual(result.value.1, expected, "the child read the pattern")
        XCTAssertEqual(rec.events.withLock { $0 }, ["fork"])
        XCTAssertEqual(st.forkEvents, 1)
        XCTAssertEqual(st.missingFaults, UInt64(len / ps), "the child's faults are in the stats: \(st)")
    }

    func testForkEventReleasedChildReadsZeros() throws {
        try require([.eventFork])
        let len = 1 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        var o = FaultHandler.Options()
        o.forkHandling = .release
        let s = try Session(r, features: [.eventFork], options: o) { _ in
            CopyPolicy(region: r, source: PatternSource(length: len, seed: 41))
        }
        let base = r.address, ps = self.ps
        let result = Box<(Int32, UInt64)>((0, 1))
        s.run(20) {
            var sum: UInt64 = 0
            let rc = cuffd_fork_and_sum(UnsafeRawPointer(bitPattern: base), UInt64(len), UInt64(ps), 20_000, &sum)
            result.update { $0 = (rc, sum) }
        }
        let st = s.finish()
        XCTAssertEqual(result.value.0, 0)
        XCTAssertEqual(result.value.1, 0, "the child's fd was closed: its memory faults normally")
        XCTAssertTrue(s.handler.loopErrors().isEmpty, "\(s.handler.loopErrors())")
        XCTAssertEqual(st.forkEvents, 1)
    }

    func testRemapRemoveUnmapEvents() throws {
        try require([.eventRemap, .eventRemove, .eventUnmap])
        let len = 16 * MiB
        let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let target = mmap(nil, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        var live = UInt(bitPattern: target)
        defer { munmap(UnsafeMutableRawPointer(bitPattern: live), len - MiB) }
        let old = UInt(bitPattern: raw)
        let src = PatternSource(length: len, seed: 42)
        let rec = EventRecorder(CopyPolicy(start: old, length: len, source: src))
        let u = try Userfaultfd(features: [.eventRemap, .eventRemove, .eventUnmap])
        try u.register(old, length: len, modes: .missing)
        let h = FaultHandler(uffd: u, policy: rec)
        try h.start()
        let ps = self.ps
        let rc = Box<Int32>(-1)
        let tgt = UInt(bitPattern: target)
        let ok = withWatchdog(60, onTimeout: { u.close(); h.stop() }) {
            // Populate the first half, then move the mapping: later faults come from the new place.
            _ = touch(old, length: len / 2, threads: 2)
            rc.update { $0 = cuffd_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), UInt64(len),
                                                UnsafeMutableRawPointer(bitPattern: tgt)) }
            _ = touch(tgt, length: len, threads: 2)
            // Write a page, drop it: the next read faults again and gets the source back.
            let p = UnsafeMutablePointer<UInt64>(bitPattern: tgt)!
            p.pointee = 0xDEAD
            madvise(UnsafeMutableRawPointer(bitPattern: tgt), 4 * ps, MADV_DONTNEED)
            XCTAssertEqual(p.pointee, PatternSource.word(at: 0, seed: 42))
            _ = touch(tgt, length: 4 * ps, threads: 1)
            // Unmap the last MiB.
            munmap(UnsafeMutableRawPointer(bitPattern: tgt + UInt(len - MiB)), MiB)
        }
        live = UInt(bitPattern: target)
        h.stop()
        u.close()
        XCTAssertTrue(ok)
        XCTAssertEqual(rc.value, 0)
        verifyPattern(target, len - MiB, seed: 42)
        let t = UInt(bitPattern: target)
        XCTAssertEqual(rec.events.withLock { $0 }, [
            "remap \(old) \(t) \(len)",
            // mremap then unmaps the old range.
            "unmap \(old) \(old + UInt(len))",
            "remove \(t) \(t + UInt(4 * ps))",
            "unmap \(t + UInt(len - MiB)) \(t + UInt(len))",
        ])
        let st = h.stats()
        XCTAssertEqual(st.remapEvents, 1)
        XCTAssertEqual(st.removeEvents, 1)
        XCTAssertEqual(st.unmapEvents, 2)
        XCTAssertEqual(st.missingFaults, UInt64(len / ps + 4), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0)
    }

    func testMovePolicyZeroFillsPagesRemovedAfterTheMove() throws {
        try require([.move, .eventRemove])
        let len = 4 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        let donor = try MappedRegion.donor(length: len)
        fillPattern(donor.pointer, len, seed: 43)
        let policy = try MovePolicy(region: r, donor: donor)
        let s = try Session(r, features: [.move, .eventRemove]) { _ in policy }
        let base = r.address, ps = self.ps
        let after = Box<UInt64>(1)
        s.run {
            _ = touch(base, length: len, threads: 2)
            madvise(UnsafeMutableRawPointer(bitPattern: base), 8 * ps, MADV_DONTNEED)
            after.update { $0 = wordSum(UnsafeRawPointer(bitPattern: base)!, 8 * ps) }
        }
        let st = s.finish()
        XCTAssertEqual(after.value, 0, "dropped pages come back as zeros, not poison")
        verifyPattern(r.pointer + 8 * ps, len - 8 * ps, seed: 43, offset: 8 * ps)
        XCTAssertEqual(st.resolutions[.zeropage], 8)
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    func testMovePolicyFollowsARemapOfTheRange() throws {
        try require([.move, .eventRemap, .eventUnmap])
        let len = 4 * MiB
        let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let target = mmap(nil, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(target, len) }
        let old = UInt(bitPattern: raw), tgt = UInt(bitPattern: target)
        let donor = try MappedRegion.donor(length: len)
        fillPattern(donor.pointer, len, seed: 47)
        let policy = try MovePolicy(start: old, length: len, donor: donor)
        let u = try Userfaultfd(features: [.move, .eventRemap, .eventUnmap])
        try u.register(old, length: len, modes: .missing)
        let h = FaultHandler(uffd: u, policy: policy)
        try h.start()
        let rc = Box<Int32>(-1)
        let ok = withWatchdog(60, onTimeout: { u.close(); h.stop() }) {
            // The first half moves in at the old address; the rest faults at the new one.
            _ = touch(old, length: len / 2, threads: 2)
            rc.update { $0 = cuffd_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), UInt64(len),
                                                UnsafeMutableRawPointer(bitPattern: tgt)) }
            _ = touch(tgt, length: len, threads: 2)
        }
        h.stop()
        u.close()
        XCTAssertTrue(ok)
        XCTAssertEqual(rc.value, 0)
        XCTAssertEqual(policy.range.start, tgt)
        verifyPattern(target, len, seed: 47)
        let st = h.stats()
        XCTAssertEqual(st.resolutions[.move], UInt64(len / ps), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    // MARK: Stop

    func testStopResolvesFaultsQueuedBeforeIt() throws {
        let len = 64 * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let src = PatternSource(length: len, seed: 44)
        // The first fault keeps the reader busy while the others queue up.
        final class Slow: FaultPolicy {
            let copy: CopyPolicy
            let first = Atomic<Bool>(true)
            init(_ c: CopyPolicy) { copy = c }
            func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
                if first.exchange(false, ordering: .relaxed) { usleep(200_000) }
                return try copy.resolve(fault, context: context)
            }
            var scratchBytes: Int { copy.scratchBytes }
        }
        let s = try Session(r) { _ in Slow(CopyPolicy(region: r, source: src)) }
        let base = r.address, ps = self.ps
        let ok = s.run {
            // Plain threads: a dispatch pool would not start more workers while these block.
            let g = DispatchGroup()
            let sum = Box<UInt64>(0)
            func fault(_ i: Int) {
                g.enter()
                Thread {
                    let v = UnsafePointer<UInt8>(bitPattern: base + UInt(i * ps))!.pointee // observable read
                    sum.update { $0 &+= UInt64(v) }
                    g.leave()
                }.start()
            }
            fault(0)
            usleep(50_000)
            for i in 1..<8 { fault(i) }
            usleep(50_000)
            s.handler.stop() // returns after the queued faults were resolved
            XCTAssertEqual(g.wait(timeout: .now() + 10), .success)
            var expected: UInt64 = 0
            for i in 0..<8 { expected &+= PatternSource.word(at: i * ps, seed: 44) & 0xFF }
            XCTAssertEqual(sum.value, expected)
        }
        XCTAssertTrue(ok)
        let st = s.finish()
        verifyPattern(r.pointer, 8 * ps, seed: 44)
        XCTAssertEqual(st.missingFaults, 8)
        XCTAssertGreaterThanOrEqual(st.stopDrained, 1, "\(st)")
    }

    func testFaultAfterStopWaitsUntilTheFdCloses() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * ps)
        let s = try Session(r) { _ in CopyPolicy(region: r, source: PatternSource(length: 4 * ps, seed: 45)) }
        s.handler.stop()
        let done = DispatchSemaphore(value: 0)
        let value = Box<UInt64>(1)
        let base = r.address
        Thread {
            value.update { $0 = UnsafePointer<UInt64>(bitPattern: base)!.pointee }
            done.signal()
        }.start()
        XCTAssertEqual(done.wait(timeout: .now() + 0.2), .timedOut, "a fault after stop stays queued")
        s.uffd.close()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "closing the fd wakes it")
        XCTAssertEqual(value.value, 0, "unregistered memory: a fresh zero page")
    }

    // MARK: Fallbacks

    private func badPagesSession(_ fallback: FaultHandler.Fallback, onlyOnce: Bool = false,
                                 features: Features = []) throws -> (MappedRegion, Session, Set<UInt>, Box<Int>) {
        let len = 4 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        let bad = Set(stride(from: 3, to: len / ps, by: 97).map { r.address + UInt($0 * ps) })
        let calls = Box<Int>(0)
        var o = FaultHandler.Options()
        o.fallback = fallback
        o.onFailure = { _ in calls.update { $0 += 1 } }
        let s = try Session(r, features: features, options: o) { _ in
            ThrowingPolicy(copy: CopyPolicy(region: r, source: PatternSource(length: len, seed: 46)), bad: bad, onlyOnce: onlyOnce)
        }
        return (r, s, bad, calls)
    }

    func testThrowingPolicyPoisonsThePageAndReportsTheError() throws {
        try require([.poison])
        let (r, s, bad, calls) = try badPagesSession(.poison, features: [.poison])
        let base = r.address, len = r.length, ps = self.ps
        let sigbus = Box<[UInt]>([])
        s.run {
            for off in stride(from: 0, to: len, by: ps) {
                var v: UInt8 = 0
                let a = base + UInt(off)
                if cuffd_read_catching_sigbus(UnsafePointer(bitPattern: a)!, &v) == 1 { sigbus.update { $0.append(a) } }
            }
        }
        let st = s.finish()
        XCTAssertEqual(Set(sigbus.value), bad, "exactly the refused pages raise SIGBUS")
        XCTAssertEqual(st.fallbacks, UInt64(bad.count), "\(st)")
        XCTAssertEqual(calls.value, bad.count)
        let f = s.handler.failures()
        XCTAssertEqual(f.count, bad.count)
        XCTAssertTrue(f.allSatisfy { $0.recoveredByFallback && $0.policyError is ThrowingPolicy.Refused })
        XCTAssertTrue(f[0].description.contains("policy threw refused"), f[0].description)
    }

    func testThrowingPolicyWithZeroFillFallback() throws {
        let (r, s, bad, _) = try badPagesSession(.zeroFill)
        let base = r.address, len = r.length
        s.run { _ = touch(base, length: len, threads: 4) }
        let st = s.finish()
        for a in bad { XCTAssertEqual(UnsafePointer<UInt64>(bitPattern: a)!.pointee, 0) }
        let good = r.address + UInt(ps)
        XCTAssertEqual(UnsafePointer<UInt64>(bitPattern: good)!.pointee, PatternSource.word(at: ps, seed: 46))
        XCTAssertEqual(st.fallbacks, UInt64(bad.count))
    }

    func testWakeFallbackRetriesThePolicy() throws {
        let (r, s, bad, calls) = try badPagesSession(.wake, onlyOnce: true)
        let base = r.address, len = r.length
        s.run { _ = touch(base, length: len, threads: 4) }
        let st = s.finish()
        verifyPattern(r.pointer, len, seed: 46)
        XCTAssertEqual(calls.value, bad.count)
        XCTAssertEqual(st.missingFaults, UInt64(len / ps + bad.count), "each refused page faulted twice: \(st)")
    }

    func testFailingSourceAndFailingIoctlGetTheFallback() throws {
        struct Broken: PageSource {
            let length = 1 << 30
            func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
                if offset == 0 { throw UffdError(.source, .ioError, detail: "disk gone") }
                // An address nobody mapped: the COPY ioctl itself fails (EFAULT).
                return UnsafeRawPointer(bitPattern: 0x1000)!
            }
        }
        let r = try MappedRegion(.anonymous(), length: 4 * ps)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { _ in CopyPolicy(region: r, source: Broken()) }
        let base = r.address, ps = self.ps
        let sum = Box<UInt64>(1)
        s.run { sum.update { $0 = touch(base, length: 2 * ps, threads: 1) } }
        let st = s.finish()
        XCTAssertEqual(sum.value, 0)
        XCTAssertEqual(st.fallbacks, 2)
        let f = s.handler.failures()
        XCTAssertEqual(f.count, 2)
        XCTAssertEqual((f.first { $0.fault.address == base }?.policyError as? UffdError)?.errno, .ioError)
        XCTAssertEqual(f.first { $0.fault.address == base + UInt(ps) }?.errno, .badAddress)
    }

    // MARK: Stats and threads

    func testStatsWhileRunningAndLatencyHistogram() throws {
        let len = 8 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        var o = FaultHandler.Options()
        o.readers = 3
        o.cpus = [0]
        o.batch = 64
        let s = try Session(r, options: o) { _ in ZeroFillPolicy(region: r) }
        let base = r.address
        s.run { _ = touch(base, length: len / 2, threads: 2) }
        let mid = s.handler.stats()
        XCTAssertEqual(mid.missingFaults, UInt64(len / 2 / ps))
        XCTAssertTrue(s.handler.isRunning)
        s.run { _ = touch(base + UInt(len / 2), length: len / 2, threads: 2) }
        let st = s.finish()
        XCTAssertFalse(s.handler.isRunning)
        XCTAssertEqual(st.missingFaults, UInt64(len / ps))
        XCTAssertEqual(st.latency.totalCount, UInt64(len / ps))
        XCTAssertGreaterThan(st.latency.valueAtPercentile(50), 0)
        XCTAssertTrue(st.description.contains("p99="), st.description)
        XCTAssertTrue(s.handler.loopErrors().isEmpty)
    }

    func testStartOnClosedFdFails() throws {
        let u = try Userfaultfd()
        u.close()
        let h = FaultHandler(uffd: u, policy: ZeroFillPolicy(start: 0, length: 0))
        XCTAssertThrowsError(try h.start()) { e in XCTAssertEqual((e as! UffdError).errno, .badFileDescriptor) }
    }
}
