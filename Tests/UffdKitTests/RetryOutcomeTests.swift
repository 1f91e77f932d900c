import CUffd
import Foundation
import SystemPackage
import XCTest
@testable import UffdKit

/// The outcome model's loose ends: EAGAIN met by a fallback or by a MOVE (an event pending),
/// and the service pipe in a forked child.
///
/// EAGAIN is provoked the way the kernel gives it: another thread's MADV_DONTNEED on a second
/// range registered with the same uffd queues a REMOVE event and blocks until a reader reads
/// it; until then every filling ioctl on that uffd says EAGAIN. The policy starts that thread
/// while it decides the first fault and waits for the event to be queued before answering, so
/// the reader performs the decision with the event pending.
final class RetryOutcomeTests: XCTestCase {
    let ps = basePageSize

    /// Wraps a policy; on its first decision queues a REMOVE on `trigger` (and waits for it).
    final class RemoveWhileDeciding: FaultPolicy, @unchecked Sendable {
        let inner: any FaultPolicy
        let trigger: UInt, triggerLength: Int
        let fails: Bool
        let started = Box(false)
        /// The uffd whose queue the REMOVE lands in.
        var uffdFD: Int32 = -1
        let remover = DispatchSemaphore(value: 0)
        /// failed() calls per faulting page address, with their errno.
        let failedCalls = Box<[UInt: [Errno]]>([:])
        init(_ inner: any FaultPolicy, trigger: UInt, triggerLength: Int, fails: Bool) {
            self.inner = inner
            self.trigger = trigger
            self.triggerLength = triggerLength
            self.fails = fails
        }
        func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
            var first = false
            started.update { if !$0 { $0 = true; first = true } }
            if first {
                let t = trigger, n = triggerLength, done = remover
                Thread.detachNewThread {
                    _ = madvise(UnsafeMutableRawPointer(bitPattern: t), n, MADV_DONTNEED)
                    done.signal()
                }
                // The madvise queues the REMOVE and waits for a reader: wait until the uffd has
                // it (the only message: the one faulting thread is asleep on this fault).
                if uffdFD >= 0 { _ = cuffd_wait_readable(uffdFD, 10_000) } else { usleep(200_000) }
            }
            if fails {
                throw UffdError(.handler, .ioError, detail: "test policy fails every fault at \(hex(fault.address))")
            }
            return try inner.resolve(fault, context: context)
        }
        func handle(event: Event, context: borrowing FaultContext) { inner.handle(event: event, context: context) }
        func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
            failedCalls.update { $0[fault.address, default: []].append(errno) }
            inner.failed(fault, resolution: resolution, errno: errno, context: context)
        }
    }

    /// Bug 1: a failed decision whose fallback meets EAGAIN (REMOVE pending) is kept and
    /// decided again after the event is read, not failed and woken. Each failing page is
    /// reported once, recovered by the fallback; the policy hears of each failed decision
    /// once (for the first page: each kept round and the final one). Before the fix the
    /// first page was reported twice: FAILED (fallback EAGAIN, woken to re-fault), then
    /// FALLBACK for its re-fault.
    func testFallbackMeetingEAGAINIsRetriedAndReportedOnce() throws {
        try require([.eventRemove])
        let pages = 4, len = pages * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let trig = try MappedRegion(.anonymous(), length: ps)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let policy = RemoveWhileDeciding(ZeroFillPolicy(region: r), trigger: trig.address, triggerLength: ps, fails: true)
        let s = try Session(r, features: [.eventRemove], options: o) { u in policy.uffdFD = u.fd; return policy }
        try s.uffd.register(trig, modes: .missing)
        let base = r.address
        XCTAssertTrue(s.run(20) { _ = touch(base, length: len, threads: 1) })
        XCTAssertEqual(policy.remover.wait(timeout: .now() + 10), .success, "the REMOVE was never read")
        let st = s.finish()
        XCTAssertEqual(wordSum(r.pointer, len), 0)
        XCTAssertGreaterThanOrEqual(st.retries, 1, "no EAGAIN was provoked: \(st)")
        let f = s.handler.failures()
        XCTAssertEqual(f.map(\.fault.address), (0..<pages).map { base + UInt($0 * ps) }, "one report per failing page: \(f)")
        XCTAssertTrue(f.allSatisfy(\.recoveredByFallback), "\(f)")
        XCTAssertEqual(st.failures, 0, "\(st)")
        XCTAssertEqual(st.fallbacks, UInt64(pages), "\(st)")
        let calls = policy.failedCalls.value
        // Once per decision: the kept ones (a round or a few: the event's reader completes it,
        // the madvise thread ends the address-space change when it runs) and the final one.
        XCTAssertGreaterThanOrEqual(calls[base]?.count ?? 0, 2, "the kept decision and the final one: \(calls)")
        XCTAssertEqual(UInt64(calls[base]?.count ?? 0), st.retries + 1, "one failed() per decision: \(calls) \(st)")
        XCTAssertTrue(calls[base]?.allSatisfy { $0 == .ioError } ?? false, "the policy's own error, not EAGAIN: \(calls)")
        for p in 1..<pages { XCTAssertEqual(calls[base + UInt(p * ps)]?.count, 1, "\(calls)") }
    }

    /// Bug 2: a MOVE that meets EAGAIN is decided again after the event; MovePolicy must not
    /// see its own "moving" mark then and answer `.wake()` forever. Before the fix the first
    /// page was woken forever (the watchdog fired); now it is moved, with the donor's bytes.
    func testMoveMeetingEAGAINIsMovedOnRetryNotWokenForever() throws {
        try require([.move, .eventRemove])
        let pages = 4, len = pages * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let donor = try MappedRegion.donor(length: len)
        fillPattern(donor.pointer, len, seed: 93)
        let trig = try MappedRegion(.anonymous(), length: ps)
        let move = try MovePolicy(region: r, donor: donor)
        let policy = RemoveWhileDeciding(move, trigger: trig.address, triggerLength: ps, fails: false)
        let s = try Session(r, features: [.move, .eventRemove]) { u in policy.uffdFD = u.fd; return policy }
        try s.uffd.register(trig, modes: .missing)
        let base = r.address
        XCTAssertTrue(s.run(20) { _ = touch(base, length: len, threads: 1) }, "the kept move was woken forever")
        XCTAssertEqual(policy.remover.wait(timeout: .now() + 10), .success, "the REMOVE was never read")
        let st = s.finish()
        XCTAssertGreaterThanOrEqual(st.retries, 1, "no EAGAIN was provoked: \(st)")
        verifyPattern(r.pointer, len, seed: 93)
        XCTAssertEqual(move.movedGranules, pages)
        XCTAssertEqual(s.handler.failures().count, 0, "\(s.handler.failures())")
        // Once per kept decision, each with the move's EAGAIN.
        let calls = policy.failedCalls.value
        XCTAssertEqual(UInt64(calls[base]?.count ?? 0), st.retries, "\(calls) \(st)")
        XCTAssertTrue(calls[base]?.allSatisfy { $0 == .resourceTemporarilyUnavailable } ?? false, "\(calls)")
        XCTAssertEqual(calls.count, 1, "only the kept fault's decisions failed: \(calls)")
    }

    /// Bug 3: a forked child that starts its own EVENT_FORK handler gets a service of its own;
    /// the parent's service pipe (inherited by fork, O_CLOEXEC does not help) must be closed
    /// there. The child counts its fds that are still the parent's pipe: before the fix, 2.
    func testForkedChildClosesTheParentsServicePipe() throws {
        guard let parent = HandlerService.running() else { throw XCTSkip("no service thread could be made") }
        func identity(_ fd: Int32) -> String {
            var buf = [CChar](repeating: 0, count: 64)
            let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
            return n > 0 ? String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        }
        let pipeID = identity(parent.readFD)
        XCTAssertTrue(pipeID.hasPrefix("pipe:"), pipeID)
        XCTAssertEqual(identity(parent.writeFD), pipeID)
        let pid = fork()
        if pid == 0 {
            alarm(20)
            guard let own = HandlerService.running(), own !== parent else { _exit(100) }
            var leaked: Int32 = 0
            for fd in Int32(0)..<4096 where identity(fd) == pipeID { leaked += 1 }
            // The child's own service works: a flush is handled by its thread.
            own.flush()
            _exit(leaked)
        }
        XCTAssertGreaterThan(pid, 0)
        var status: Int32 = 0
        let deadline = Date().addingTimeInterval(30)
        while waitpid(pid, &status, WNOHANG) == 0 {
            if Date() > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                XCTFail("the child hung")
                return
            }
            usleep(10_000)
        }
        XCTAssertTrue(status & 0x7f == 0, "the child died of signal \(status & 0x7f)")
        XCTAssertEqual((status >> 8) & 0xff, 0, "fds of the parent's service pipe left open in the child (100: no new service)")
        // The parent's service is untouched.
        XCTAssertTrue(HandlerService.running() === parent)
        XCTAssertEqual(identity(parent.readFD), pipeID)
        parent.flush()
    }
}
