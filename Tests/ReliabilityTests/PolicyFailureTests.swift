import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

/// Policies that throw or answer with an invalid resolution, and page sources that fail.
/// Decided outcomes: the faulting thread gets the handler's fallback on its own page (poison →
/// SIGBUS, zeroFill → a zero page, wake → the policy is asked again), the failure is reported
/// through `failures()` with the policy's error or the ioctl's errno, and every other page is
/// served normally. No thread is left blocked.
final class PolicyFailureTests: XCTestCase {
    let pages = 16
    let bad = 5

    /// A CopyPolicy over a PatternSource that throws for page `bad`.
    func throwingPolicy(_ r: MappedRegion, times: Int = .max) -> ClosurePolicy {
        let copy = CopyPolicy(region: r, source: PatternSource(length: r.length))
        let base = r.address, bad = self.bad
        let thrown = Atomic<Int>(0)
        return ClosurePolicy(inner: copy) { f, ctx in
            if f.address == base + UInt(bad * basePageSize), thrown.add(1, ordering: .relaxed).newValue <= times {
                throw UffdError(.argument, .ioError, detail: "injected policy failure")
            }
            return try copy.resolve(f, context: ctx)
        }
    }

    func testPolicyThrowsPoisonFallbackRaisesSIGBUS() throws {
        try isolated {
            try requireFeatures([.poison])
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let (_, h) = try startHandler(r, features: [.poison], options: options(.poison)) { _ in throwingPolicy(r) }
            let got = readPages(r.address, Array(0..<pages), pageSize: basePageSize)
            h.stop()
            assertPages(got, Array(0..<pages)) { $0 == self.bad ? .sigbus : .value(patternWord($0)) }
            let f = h.failures()
            XCTAssertEqual(f.count, 1, "\(f)")
            XCTAssertNotNil(f.first?.policyError)
            XCTAssertEqual(f.first?.fault.address, r.address + UInt(bad * basePageSize))
            XCTAssertEqual(f.first?.recoveredByFallback, true)
            XCTAssertEqual(h.stats().fallbacks, 1)
            report("outcome=\(f.first.map { "\($0)" } ?? "-")")
        }
    }

    func testPolicyThrowsZeroFillFallbackMapsZeros() throws {
        try isolated {
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let (_, h) = try startHandler(r, options: options(.zeroFill)) { _ in throwingPolicy(r) }
            let got = readPages(r.address, Array(0..<pages), pageSize: basePageSize)
            h.stop()
            assertPages(got, Array(0..<pages)) { $0 == self.bad ? .value(0) : .value(patternWord($0)) }
            XCTAssertEqual(h.failures().count, 1)
            XCTAssertEqual(h.stats().fallbacks, 1)
        }
    }

    func testPolicyThrowsWakeFallbackAsksThePolicyAgain() throws {
        try isolated {
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            // Fails three times, then succeeds: the thread re-faults until the policy answers.
            let (_, h) = try startHandler(r, options: options(.wake)) { _ in throwingPolicy(r, times: 3) }
            let got = readPages(r.address, Array(0..<pages), pageSize: basePageSize)
            h.stop()
            assertPages(got, Array(0..<pages)) { .value(patternWord($0)) }
            XCTAssertEqual(h.failures().count, 3)
            XCTAssertEqual(h.failures().filter { !$0.recoveredByFallback }.count, 0, "a wake is the fallback working")
        }
    }

    /// A policy that answers page `bad` with `make(...)` the first `times` times, then correctly.
    func misdirecting(_ r: MappedRegion, _ outside: MappedRegion, times: Int,
                      _ make: @escaping @Sendable (_ fault: Fault, _ region: MappedRegion, _ outside: UInt) -> Resolution)
        -> (ClosurePolicy, Counter) {
        let copy = CopyPolicy(region: r, source: PatternSource(length: r.length))
        let base = r.address, bad = self.bad, out = outside.address
        let asked = Counter()
        let policy = ClosurePolicy(inner: copy) { f, ctx in
            if f.address == base + UInt(bad * basePageSize), asked.next() <= times {
                return make(f, r, out)
            }
            return try copy.resolve(f, context: ctx)
        }
        return (policy, asked)
    }

    /// Resolutions the kernel rejects (misaligned, a length that is not a page multiple: EINVAL)
    /// get the fallback on the **faulting** page (never on the invalid range, which would leave
    /// the thread asleep), and are reported.
    func rejectedResolution(_ make: @escaping @Sendable (_ fault: Fault, _ region: MappedRegion, _ outside: UInt) -> Resolution) throws {
        let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
        let outside = try MappedRegion(.anonymous(), length: pages * basePageSize) // mapped, never registered
        let (policy, _) = misdirecting(r, outside, times: .max, make)
        let (_, h) = try startHandler(r, options: options(.zeroFill)) { _ in policy }
        let got = readPages(r.address, Array(0..<pages), pageSize: basePageSize, timeout: 5)
        if got == nil { h.uffd.close() } // release the blocked thread so the child can report
        h.stop()
        assertPages(got, Array(0..<pages)) { $0 == self.bad ? .value(0) : .value(patternWord($0)) }
        let f = h.failures()
        XCTAssertEqual(f.count, 1, "\(f)")
        XCTAssertEqual(f.first?.errno.rawValue, EINVAL, "\(f)")
        report("outcome=\(f.first.map { "\($0)" } ?? "-")")
    }

    func testMisalignedResolutionGetsFallbackOnTheFaultingPage() throws {
        try isolated {
            try rejectedResolution({ f, _, outside in .copy(from: outside, to: f.address + 8, length: basePageSize) })
        }
    }

    func testResolutionLengthNotAPageMultipleGetsFallbackOnTheFaultingPage() throws {
        try isolated {
            try rejectedResolution({ f, _, outside in .copy(from: outside, to: f.address, length: 100) })
        }
    }

    /// Resolutions that are valid but miss the faulting page (another registered page, memory
    /// outside the registered area): performed as asked, and the faulting thread is woken so it
    /// re-faults and the policy is asked again (here it answers right the 4th time). A policy
    /// that keeps missing keeps its thread re-faulting (visible in the stats), never asleep.
    func missedPage(_ make: @escaping @Sendable (_ fault: Fault, _ region: MappedRegion, _ outside: UInt) -> Resolution) throws {
        let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
        let outside = try MappedRegion(.anonymous(), length: pages * basePageSize)
        let (policy, asked) = misdirecting(r, outside, times: 3, make)
        let (_, h) = try startHandler(r, options: options(.poison)) { _ in policy }
        let got = readPages(r.address, [bad], pageSize: basePageSize, timeout: 5)
        if got == nil { h.uffd.close() }
        h.stop()
        assertPages(got, [bad]) { .value(patternWord($0)) }
        XCTAssertEqual(asked.count, 4, "the policy was not asked again after each miss")
        XCTAssertEqual(h.stats().missingFaults, 4)
        report("missed page: asked=\(asked.count) \(h.stats())")
    }

    func testResolutionOfAnotherPageWakesTheThreadToRefault() throws {
        try isolated {
            try missedPage({ _, r, _ in .zeropage(r.address + UInt(14 * basePageSize), length: basePageSize) })
        }
    }

    func testResolutionOutsideRegisteredAreaWakesTheThreadToRefault() throws {
        try isolated {
            try missedPage({ _, _, outside in .copy(from: outside, to: outside + UInt(basePageSize), length: basePageSize) })
        }
    }

    func testWakeOnlyPolicyDoesNotHang() throws {
        try isolated {
            // A policy that only wakes resolves nothing: the thread re-faults until the policy
            // changes its mind (here after 50 wakes), never sleeps for good.
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let n = Atomic<Int>(0)
            let (_, h) = try startHandler(r) { _ in
                ClosurePolicy { f, _ in n.add(1, ordering: .relaxed).newValue < 50 ? .wake() : .zeropage() }
            }
            let got = readPages(r.address, [0], pageSize: basePageSize)
            h.stop()
            assertPages(got, [0]) { _ in .value(0) }
            XCTAssertGreaterThanOrEqual(n.load(ordering: .relaxed), 50)
        }
    }

    // MARK: page sources

    /// A source that fails with EIO at one page.
    struct FailingSource: PageSource {
        let inner: PatternSource
        let badOffset: Int
        var length: Int { inner.length }
        func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
            if offset <= badOffset && badOffset < offset + count {
                throw UffdError(.source, .ioError, detail: "injected I/O error at \(badOffset)")
            }
            return try inner.bytes(at: offset, count: count, scratch: scratch)
        }
    }

    func testSourceIOErrorAtPageKPoisonsOnlyThatPage() throws {
        try isolated {
            try requireFeatures([.poison])
            let r = try MappedRegion(.anonymous(), length: pages * basePageSize)
            let src = FailingSource(inner: PatternSource(length: r.length), badOffset: bad * basePageSize)
            let (_, h) = try startHandler(r, features: [.poison]) { _ in CopyPolicy(region: r, source: src) }
            let got = readPages(r.address, Array(0..<pages), pageSize: basePageSize, threads: 2)
            h.stop()
            assertPages(got, Array(0..<pages)) { $0 == self.bad ? .sigbus : .value(patternWord($0)) }
            let f = h.failures()
            XCTAssertEqual(f.count, 1)
            let e = f.first?.policyError as? UffdError
            XCTAssertEqual(e?.operation, .source)
            XCTAssertEqual(e?.errno, .ioError)
            XCTAssertTrue(e?.explanation.contains("page source") ?? false, "\(String(describing: e))")
        }
    }

    func testFileTruncatedUnderTheHandlerReadsZeros() throws {
        try isolated {
            let ps = basePageSize
            let path = NSTemporaryDirectory() + "uffdkit-rel-\(getpid()).img"
            defer { unlink(path) }
            var image = [UInt8](repeating: 0, count: pages * ps)
            image.withUnsafeMutableBytes { b in
                let w = b.baseAddress!.assumingMemoryBound(to: UInt64.self)
                for i in 0..<(b.count / 8) { w[i] = PatternSource.word(at: i * 8, seed: 0x5EED) }
            }
            XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(image)))
            let src = try FileSource(path: path)
            let r = try MappedRegion(.anonymous(), length: pages * ps)
            let (_, h) = try startHandler(r) { _ in CopyPolicy(region: r, source: src) }
            let first = readPages(r.address, Array(0..<4), pageSize: ps)
            // Truncate in the middle of page 8 while the handler serves the mapping.
            XCTAssertEqual(truncate(path, off_t(8 * ps + 64)), 0)
            let rest = readPages(r.address, Array(4..<pages), pageSize: ps, threads: 2)
            h.stop()
            assertPages(first, Array(0..<4)) { .value(patternWord($0)) }
            assertPages(rest, Array(4..<pages)) { $0 <= 8 ? .value(patternWord($0)) : .value(0) }
            // Page 8: 64 bytes of the file, then zeros.
            let w = UnsafePointer<UInt64>(bitPattern: r.address + UInt(8 * ps))!
            XCTAssertEqual(w[8], 0)
            XCTAssertEqual(w[7], PatternSource.word(at: 8 * ps + 56, seed: 0x5EED))
            XCTAssertEqual(h.failures().count, 0, "a short file is not an error: the tail reads as zeros")
        }
    }
}
