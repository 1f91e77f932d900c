import CUffd
import Foundation
import SystemPackage
import XCTest
@testable import UffdKit

/// InThreadResolver: faults resolved in the faulting thread (UFFD_FEATURE_SIGBUS), in this
/// process (the C-level cases that kill or fork run isolated in CUffdTests.InThreadTests).
final class InThreadResolverTests: XCTestCase {
    override func setUpWithError() throws {
        try require(.sigbus)
    }

    /// 4 threads fault through 16 MiB copied from memory: every byte is the source's, each page
    /// is resolved exactly once, nothing failed; uninstall leaves the handler passing through.
    func testCopyFromMemoryManyThreads() throws {
        let length = 16 * MiB
        let region = try MappedRegion(.anonymous(), length: length)
        let source = try MappedRegion(.anonymous(), length: length)
        fillPattern(source.pointer, length, seed: 7)
        let resolver = try InThreadResolver()
        let range = try resolver.add(region, policy: .copy(from: source.address))
        try resolver.install()
        XCTAssertTrue(InThreadResolver.isInstalled)
        withWatchdog(60, onTimeout: { resolver.uninstall() }) {
            _ = touch(region.address, length: length, threads: 4)
        }
        XCTAssertEqual(wordSum(region.pointer, length), wordSum(source.pointer, length))
        XCTAssertEqual(memcmp(region.pointer, source.pointer, length), 0)
        let s = resolver.stats(range)
        XCTAssertEqual(s.resolved, UInt64(length / basePageSize))
        XCTAssertEqual(s.copies, s.resolved)
        XCTAssertEqual(s.bytes, UInt64(length))
        XCTAssertEqual(s.signals, s.resolved + s.existed + s.gone)
        XCTAssertEqual(s.fallbacks + s.delivered + s.loopBreaks, 0)
        XCTAssertNil(s.firstError)
        XCTAssertTrue(resolver.uninstall())
        XCTAssertFalse(InThreadResolver.isInstalled)
        XCTAssertTrue(resolver.ranges.isEmpty)
    }

    /// Fault-service latency through the Swift API: 3 threads fault 4 MiB (1024 pages): one
    /// sample per signal (so as many as the resolved pages plus the EEXIST losers), percentiles
    /// positive and in order up to an exact max; a range added without `recordLatency` (the default) has none.
    func testLatencyHistogram() throws {
        let length = 4 * MiB
        let region = try MappedRegion(.anonymous(), length: 2 * length)
        let source = try MappedRegion(.anonymous(), length: length)
        fillPattern(source.pointer, length, seed: 5)
        let resolver = try InThreadResolver()
        let timed = try resolver.add(region.address, length: length, policy: .copy(from: source.address), recordLatency: true)
        let untimed = try resolver.add(region.address + UInt(length), length: length, policy: .copy(from: source.address))
        try resolver.install()
        defer { resolver.uninstall() }
        withWatchdog(60, onTimeout: { resolver.uninstall() }) {
            _ = touch(region.address, length: 2 * length, threads: 3)
        }
        XCTAssertEqual(memcmp(region.pointer, source.pointer, length), 0)
        let s = resolver.stats(timed)
        let l = s.latency
        XCTAssertEqual(s.resolved, UInt64(length / basePageSize))
        XCTAssertEqual(l.count, s.signals - s.loopBreaks)
        XCTAssertEqual(l.count, s.resolved + s.existed + s.gone)
        XCTAssertEqual(l.buckets.reduce(0, +), l.count)
        XCTAssertGreaterThan(l.minNs, 0)
        XCTAssertLessThanOrEqual(l.minNs, l.p50)
        XCTAssertLessThanOrEqual(l.p50, l.p90)
        XCTAssertLessThanOrEqual(l.p90, l.p99)
        XCTAssertGreaterThanOrEqual(l.maxNs, l.p99)
        XCTAssertEqual(l.percentile(100), l.maxNs)
        XCTAssertGreaterThanOrEqual(l.meanNs, Double(l.minNs))
        XCTAssertLessThanOrEqual(l.meanNs, Double(l.maxNs))
        XCTAssertTrue(l.description.contains("p99="), l.description)
        let u = resolver.stats(untimed)
        XCTAssertEqual(u.resolved, UInt64(length / basePageSize))
        XCTAssertEqual(u.latency.count, 0)
        XCTAssertEqual(u.latency.p50, 0)
        XCTAssertEqual(u.latency.description, "no samples")
    }

    /// The README's in-thread example, as written there (plus the checks).
    func testReadmeExample() throws {
        let source = try MappedRegion(.anonymous(), length: 64 << 20)
        fillPattern(source.pointer, source.length, seed: 11)

        let region = try MappedRegion(.anonymous(), length: 64 << 20)
        let resolver = try InThreadResolver()                 // its own uffd, features [.sigbus]
        let range = try resolver.add(region, policy: .copy(from: source.address), fallback: .signal,
                                     recordLatency: true)     // fault-service latency: two clock reads per fault
        try resolver.install()                                // sigaction(SIGBUS), remembering the old action
        withWatchdog(60, onTimeout: { resolver.uninstall() }) {
            _ = touch(region.address, length: region.length, threads: 2)
        }
        let stats = resolver.stats(range)
        resolver.uninstall()                                  // unregister + remove; the handler passes through

        XCTAssertEqual(stats.resolved, UInt64(region.length / basePageSize))
        XCTAssertEqual(stats.latency.count, stats.signals - stats.loopBreaks)
        XCTAssertEqual(memcmp(region.pointer, source.pointer, region.length), 0)
    }

    /// A file source: pages come from the file; the part of the last page past its end and the
    /// pages after it are zeros.
    func testFileSourceZerosPastEnd() throws {
        let page = basePageSize
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("inthread-\(getpid()).bin").path
        defer { unlink(path) }
        var bytes = [UInt8](repeating: 0, count: 5 * page + 100)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) | 1 }
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let region = try MappedRegion(.anonymous(), length: 8 * page)
        let resolver = try InThreadResolver()
        let range = try resolver.add(region, policy: .file(path: path), fallback: .signal)
        try resolver.install()
        defer { resolver.uninstall() }
        withWatchdog(30, onTimeout: { resolver.uninstall() }) {
            _ = touch(region.address, length: region.length, threads: 2)
        }
        let got = Array(region.bytes)
        XCTAssertEqual(Array(got[0..<bytes.count]), bytes)
        XCTAssertTrue(got[bytes.count...].allSatisfy { $0 == 0 })
        XCTAssertEqual(resolver.stats(range).resolved, 8)
    }

    /// A source the kernel cannot read (PROT_NONE): COPY fails with EFAULT and the zero-fill
    /// fallback lets every thread go on; the failure is counted with its errno.
    func testFailingSourceTakesZeroFillFallback() throws {
        let length = 64 * basePageSize
        let region = try MappedRegion(.anonymous(), length: length)
        let hole = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(hole, length) }
        let resolver = try InThreadResolver()
        let range = try resolver.add(region, policy: .copy(from: UInt(bitPattern: hole)), fallback: .zeroFill)
        try resolver.install()
        defer { resolver.uninstall() }
        let readSum = Box<UInt64>(1)
        withWatchdog(30, onTimeout: { resolver.uninstall() }) {
            let s = touch(region.address, length: length, threads: 2)
            readSum.update { $0 = s }
        }
        XCTAssertEqual(readSum.value, 0)
        XCTAssertEqual(wordSum(region.pointer, length), 0)
        let s = resolver.stats(range)
        XCTAssertEqual(s.fallbacks, 64)
        XCTAssertEqual(s.zeropages, 64)
        XCTAssertEqual(s.firstError, .badAddress)
        XCTAssertEqual(s.delivered, 0)
    }

    /// In SIGBUS mode a syscall writing into an unresolved page fails with EFAULT; after
    /// `prefault` it succeeds and the rest of the page holds the source.
    func testSyscallNeedsPrefault() throws {
        let page = basePageSize
        let region = try MappedRegion(.anonymous(), length: 4 * page)
        let source = try MappedRegion(.anonymous(), length: 4 * page)
        fillPattern(source.pointer, source.length, seed: 3)
        let resolver = try InThreadResolver()
        let range = try resolver.add(region, policy: .copy(from: source.address))
        try resolver.install()
        defer { resolver.uninstall() }
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        defer { close(fds[0]); close(fds[1]) }
        XCTAssertEqual(write(fds[1], "abcd", 4), 4)
        let dst = region.pointer + page + 16
        XCTAssertEqual(read(fds[0], dst, 4), -1)
        XCTAssertEqual(errno, EFAULT)
        try resolver.prefault(range, start: region.address + UInt(page) + 16, length: 4)
        XCTAssertEqual(read(fds[0], dst, 4), 4)
        XCTAssertEqual(memcmp(region.pointer + page, source.pointer + page, 16), 0)
        XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: dst, count: 4), as: UTF8.self), "abcd")
        XCTAssertThrowsError(try resolver.prefault(range, start: region.address, length: 5 * page))
    }

    /// "How to get both": memory handed to syscalls lives in a second range on a fd-mode
    /// userfaultfd served by a FaultHandler (kernel faults wait for it), next to an in-thread range.
    func testSecondFdModeRangeServesSyscalls() throws {
        let page = basePageSize
        let inThread = try MappedRegion(.anonymous(), length: 4 * page)
        let forSyscalls = try MappedRegion(.anonymous(), length: 4 * page)
        let resolver = try InThreadResolver()
        _ = try resolver.add(inThread, policy: .zero)
        try resolver.install()
        defer { resolver.uninstall() }
        let fdMode: Userfaultfd
        do {
            fdMode = try Userfaultfd(options: [.nonBlocking, .kernelFaults])
        } catch {
            throw XCTSkip("kernel-mode faults are not allowed for this user: \(error)")
        }
        _ = try fdMode.register(forSyscalls, modes: .missing)
        let handler = FaultHandler(uffd: fdMode, policy: ZeroFillPolicy(region: forSyscalls))
        try handler.start()
        defer { handler.stop() }
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        defer { close(fds[0]); close(fds[1]) }
        XCTAssertEqual(write(fds[1], "wxyzwxyz", 8), 8)
        let ok = Box<Int>(-2)
        let readEnd = fds[0]
        withWatchdog(30, onTimeout: { handler.stop(); fdMode.close() }) {
            let n = read(readEnd, forSyscalls.pointer + page, 4)  // a kernel fault, served by the handler
            ok.update { $0 = n }
        }
        XCTAssertEqual(ok.value, 4)
        XCTAssertEqual(read(fds[0], inThread.pointer + page, 4), -1)  // SIGBUS mode: EFAULT
        XCTAssertEqual(errno, EFAULT)
        handler.stop() // the readers' counters are complete once they stopped
        XCTAssertEqual(handler.stats().faults, 1)
    }

    /// Bad input is refused with a clear error: a fd without SIGBUS mode or with events, a misaligned range,
    /// an overlapping range, a file that does not exist, a donor shorter than the range.
    func testBadInput() throws {
        let page = basePageSize
        let plain = try Userfaultfd()
        XCTAssertThrowsError(try InThreadResolver(uffd: plain)) { e in
            XCTAssertTrue("\(e)".contains("sigbus"), "\(e)")
        }
        XCTAssertThrowsError(try InThreadResolver(features: .eventRemove)) { e in
            XCTAssertTrue("\(e)".contains("events"), "\(e)")
        }
        let region = try MappedRegion(.anonymous(), length: 4 * page)
        let resolver = try InThreadResolver()
        XCTAssertThrowsError(try resolver.add(region.address + 1, length: page, policy: .zero, register: false)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .invalidArgument)
        }
        let r = try resolver.add(region, policy: .zero)
        XCTAssertThrowsError(try resolver.add(region.address, length: page, policy: .zero, register: false)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .fileExists)
            XCTAssertTrue("\(e)".contains("overlaps"), "\(e)")
        }
        resolver.remove(r)
        // The id is reused by the next range; removing the old one again must not remove it.
        let r2 = try resolver.add(region, policy: .zero)
        resolver.remove(r)
        XCTAssertEqual(resolver.ranges, [r2])
        resolver.remove(r2)
        XCTAssertThrowsError(try resolver.add(region, policy: .file(path: "/no/such/file"))) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .noSuchFileOrDirectory)
        }
        let donor = try MappedRegion.donor(length: page)
        XCTAssertThrowsError(try resolver.add(region, policy: .move(donor: donor)))
        XCTAssertTrue(resolver.ranges.isEmpty)
    }
}
