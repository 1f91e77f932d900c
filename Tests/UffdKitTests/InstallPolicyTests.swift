import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// Lazy loads at memory speed (issue 14): the window installer (huge-page donor + UFFDIO_MOVE,
/// prefetch threads), its fallbacks to COPY, and the one-copy mapped FileSource. Every test
/// checks every byte of the region against the file (zeros past its end) and runs its faulting
/// code under a watchdog.
final class InstallPolicyTests: XCTestCase {
    let window = 2 << 20

    /// A temporary file of `size` bytes: the pattern, then 0x77 for a last partial word.
    /// Returns its path and the expected image of `regionLength` bytes (zeros past the file).
    func makeFile(size: Int, regionLength: Int, seed: UInt64 = 14) -> (String, UnsafeMutableRawPointer) {
        let path = NSTemporaryDirectory() + "uffdkit-install-\(getpid())-\(seed).img"
        let expected = UnsafeMutableRawPointer.allocate(byteCount: regionLength, alignment: basePageSize)
        memset(expected, 0, regionLength)
        let words = size / 8 * 8
        fillPattern(expected, words, seed: seed)
        memset(expected + words, 0x77, size - words)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes: expected, count: size)))
        return (path, expected)
    }

    /// A THP-aligned anonymous region of `length` with `advice` (MADV_HUGEPAGE by default).
    func region(_ length: Int, advice: Int32 = MADV_HUGEPAGE) throws -> MappedRegion {
        let r = try MappedRegion(.anonymous(thpAligned: true), length: length)
        try r.advise(advice)
        return r
    }

    /// Loads `r` through `policy` with `threads` sequential readers and checks every byte.
    @discardableResult
    func load(_ r: MappedRegion, expected: UnsafeRawPointer, threads: Int = 1,
              policy: @escaping (Userfaultfd) throws -> InstallPolicy,
              file: StaticString = #filePath, line: UInt = #line) throws -> (InstallPolicy, HandlerStats, Int, [HandlerFailure]) {
        var made: InstallPolicy?
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { u in
            let p = try policy(u)
            made = p
            return p
        }
        let base = r.address, length = r.length
        s.run(file: file, line: line) { _ = touch(base, length: length, threads: threads) }
        let p = made!
        p.stopPrefetching()
        let huge = (try? p.hugePageBytes()) ?? -1
        let failures = s.handler.failures()
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, expected, r.length), 0, "the region differs from the file", file: file, line: line)
        XCTAssertEqual(failures.count, 0, "no fault may fail: \(failures)", file: file, line: line)
        XCTAssertEqual(p.stats.failed, 0, file: file, line: line)
        return (p, st, huge, failures)
    }

    func thpOrSkip(_ r: MappedRegion) throws {
        if !WindowInstaller.thpEligible(r.address) { throw XCTSkip("THP cannot back anonymous memory here (THP off)") }
    }

    func testInstallMovesHugeWindowsWithPrefetch_everyByte() throws {
        let size = 10 * MiB + 1234, length = (size + basePageSize - 1) / basePageSize * basePageSize
        let (path, expected) = makeFile(size: size, regionLength: length)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        try thpOrSkip(r)
        let src = try FileSource(path: path)
        let (p, _, huge, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 1, ahead: 2)
        }
        XCTAssertNil(p.fastPathUnavailable)
        let st = p.stats
        XCTAssertEqual(st.moved, 5, "the five whole windows move: \(st)")
        XCTAssertEqual(st.copied, 1, "the last, partial window is copied: \(st)")
        XCTAssertEqual(st.fallbacks, 0)
        XCTAssertEqual(huge, 5 * window, "the moved windows are backed by huge pages")
    }

    func testInstallWithoutPrefetchTwoThreads_everyByte() throws {
        let size = 8 * MiB, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 15)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        try thpOrSkip(r)
        let src = try FileSource(path: path, access: .mapped)
        let (p, _, huge, _) = try load(r, expected: expected, threads: 2) { u in
            InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 0)
        }
        XCTAssertEqual(p.stats.moved, 4)
        XCTAssertEqual(p.stats.prefetched, 0)
        XCTAssertEqual(huge, length)
    }

    /// A file shorter than the region and not a page multiple: the windows past it move zeros.
    func testFileShorterThanRegionReadsZeroTail() throws {
        let size = 3 * MiB + 100, length = 8 * MiB
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 16)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        try thpOrSkip(r)
        let src = try FileSource(path: path)
        let (p, _, _, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 1)
        }
        XCTAssertEqual(p.stats.moved, 4)
        XCTAssertEqual((r.pointer + size).load(as: UInt8.self), 0)
    }

    func testNoHugePageDestinationFallsBackToCopy() throws {
        let size = 6 * MiB + 4096, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 17)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length, advice: MADV_NOHUGEPAGE)
        let src = try FileSource(path: path)
        let (p, _, huge, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 1)
        }
        XCTAssertNotNil(p.fastPathUnavailable)
        XCTAssertEqual(p.installer?.mode, .copy)
        XCTAssertEqual(p.stats.moved, 0)
        XCTAssertEqual(p.stats.copied, 4, "every window copied from its donor: \(p.stats)")
        XCTAssertEqual(huge, 0)
    }

    /// THP unavailable to the process (PR_SET_THP_DISABLE, what `THP never` means for it).
    func testTHPDisabledFallsBackToCopy() throws {
        let size = 4 * MiB, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 18)
        defer { unlink(path); expected.deallocate() }
        guard cuffd_set_thp_disable(true) == 0 else { throw XCTSkip("PR_SET_THP_DISABLE refused") }
        defer { _ = cuffd_set_thp_disable(false) }
        XCTAssertEqual(cuffd_thp_available(nil), 0)
        let r = try region(length)
        let src = try FileSource(path: path)
        let (p, _, huge, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, prefetchThreads: 1)
        }
        XCTAssertEqual(p.installer?.mode, .copy)
        XCTAssertEqual(p.stats.moved, 0)
        XCTAssertEqual(p.stats.copied, 2)
        XCTAssertEqual(huge, 0)
    }

    /// A move that fails (EEXIST: a page of the window was resolved before) is completed by
    /// COPY for that window; the page already there keeps its bytes, no other byte is lost.
    func testFailedMoveFallsBackToCopyPerWindow_EEXIST() throws {
        let size = 6 * MiB, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 19)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        let src = try FileSource(path: path)
        var made: InstallPolicy?
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { u in
            // Page 7 of window 1 is resolved before any fault: the move of window 1 meets it.
            let marker = UnsafeMutableRawPointer.allocate(byteCount: basePageSize, alignment: basePageSize)
            defer { marker.deallocate() }
            memset(marker, 0xAB, basePageSize)
            _ = try u.copy(to: r.address + UInt(window + 7 * basePageSize), from: UInt(bitPattern: marker),
                           length: basePageSize)
            let p = InstallPolicy(region: r, uffd: u, source: src, mode: .move, prefetchThreads: 0)
            made = p
            return p
        }
        let base = r.address
        s.run { _ = touch(base, length: length, threads: 1) }
        let failures = s.handler.failures()
        _ = s.finish()
        let p = made!
        memset(expected + window + 7 * basePageSize, 0xAB, basePageSize)
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0, "the region differs from the file")
        XCTAssertEqual(failures.count, 0)
        XCTAssertEqual(p.stats.moved, 2, "\(p.stats)")
        XCTAssertEqual(p.stats.fallbacks, 1, "\(p.stats)")
        XCTAssertEqual(p.stats.copied, 1, "\(p.stats)")
        XCTAssertEqual(p.stats.failed, 0)
    }

    /// A VMA boundary inside a window (mprotect of one page): the move cannot cross it, the
    /// copy of the window cannot either (ENOENT with no progress); the window is copied page by
    /// page on both sides of the boundary, and no thread re-faults forever.
    func testVMABoundaryInsideWindowFallsBack_ENOENT() throws {
        let size = 6 * MiB, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 20)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        let src = try FileSource(path: path)
        XCTAssertEqual(mprotect(r.pointer + window + 5 * basePageSize, basePageSize, PROT_READ), 0)
        let (p, _, _, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, mode: .move, prefetchThreads: 0)
        }
        XCTAssertEqual(p.stats.moved, 2, "\(p.stats)")
        XCTAssertEqual(p.stats.fallbacks, 1, "\(p.stats)")
    }

    /// A background filler (the prefetch issue's use): windows installed without any fault.
    func testPrefetchWithoutFaultsFromAFiller() throws {
        let size = 6 * MiB, length = size
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 21)
        defer { unlink(path); expected.deallocate() }
        let r = try region(length)
        let src = try FileSource(path: path)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        var inst: WindowInstaller?
        let s = try Session(r, options: o) { u in
            let i = try WindowInstaller(uffd: u, start: r.address, length: length, source: src,
                                        mode: WindowInstaller.thpEligible(r.address) ? .move : .copy)
            inst = i
            return CopyPolicy(region: r, source: src)
        }
        let i = inst!
        let ok = s.run {
            for w in 0..<i.windows { XCTAssertTrue((try? i.prefetch(window: w)) ?? false) }
            XCTAssertFalse((try? i.prefetch(window: 0)) ?? true, "a window is installed once")
        }
        XCTAssertTrue(ok)
        let base = r.address
        s.run { _ = touch(base, length: length, threads: 1) }
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0)
        XCTAssertEqual(i.stats.prefetched, 3)
        XCTAssertEqual(st.faults, 0, "no fault: the filler installed everything first")
    }

    /// The one-copy path: UFFDIO_COPY straight from a mapping of the file, tail zero-filled.
    func testMappedFileSourceCopiesEveryByte() throws {
        let size = 3 * MiB + 777, length = (size + basePageSize - 1) / basePageSize * basePageSize
        let (path, expected) = makeFile(size: size, regionLength: length, seed: 22)
        defer { unlink(path); expected.deallocate() }
        let src = try FileSource(path: path, access: .mapped)
        XCTAssertEqual(src.access, .mapped)
        let r = try MappedRegion(.anonymous(), length: length)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { _ in
            ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .adaptive(minPages: 1, maxPages: 64))
        }
        let base = r.address
        s.run { _ = touch(base, length: length, threads: 2) }
        let failures = s.handler.failures()
        _ = s.finish()
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0)
        XCTAssertEqual(failures.count, 0)
    }

    /// A readahead window across a VMA boundary inside the registered range (mprotect of one
    /// page): the kernel refuses the whole window with ENOENT and no progress; the loop resolves
    /// the faulting page alone instead of calling it gone and waking it into the same fault
    /// forever (which the watchdog would report).
    func testReadaheadWindowAcrossVMABoundaryIsResolved() throws {
        let length = 2 * MiB
        let r = try MappedRegion(.anonymous(), length: length)
        try r.advise(MADV_NOHUGEPAGE)
        XCTAssertEqual(mprotect(r.pointer + 100 * basePageSize, basePageSize, PROT_READ), 0)
        let src = PatternSource(length: length, seed: 23)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { _ in
            ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .fixed(pages: 64))
        }
        let base = r.address
        let finished = s.run(20) { _ = touch(base, length: length, threads: 1) }
        let failures = s.handler.failures()
        let st = s.finish()
        XCTAssertTrue(finished)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: basePageSize)
        defer { expected.deallocate() }
        fillPattern(expected, length, seed: 23)
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0)
        XCTAssertEqual(failures.count, 0, "\(failures)")
        XCTAssertEqual(st.fallbacks, 0)
    }

    /// A move refused with EBUSY (the donor's huge page is shared with a forked child, so it is
    /// not exclusive to this process): that window is copied from the donor instead, every byte
    /// right, and the other windows still move.
    func testFailedMoveFallsBackToCopyPerWindow_EBUSY() throws {
        let length = 6 * MiB
        let r = try region(length)
        try thpOrSkip(r)
        let src = ForkingSource(length: length, forkAt: window, seed: 24)
        defer { src.release() }
        let expected = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: basePageSize)
        defer { expected.deallocate() }
        fillPattern(expected, length, seed: 24)
        let (p, _, huge, _) = try load(r, expected: expected) { u in
            InstallPolicy(region: r, uffd: u, source: src, mode: .move, prefetchThreads: 0)
        }
        XCTAssertTrue(src.forked, "the source forked a child sharing the donor of window 1")
        XCTAssertEqual(p.stats.moved, 2, "\(p.stats)")
        XCTAssertEqual(p.stats.fallbacks, 1, "\(p.stats)")
        XCTAssertEqual(p.stats.copied, 1, "\(p.stats)")
        XCTAssertEqual(huge, 2 * window, "the two moved windows are huge pages, the copied one is not")
    }
}

/// The pattern image; when filling the window at `forkAt` it makes the donor forkable and forks
/// a child that holds the donor's pages (copy-on-write) until ``release()``: UFFDIO_MOVE of that
/// donor then fails with EBUSY.
final class ForkingSource: PageSource, @unchecked Sendable {
    let length: Int
    let forkAt: Int
    let seed: UInt64
    private(set) var forked = false
    private var child: pid_t = -1
    private var pipeFds: [Int32] = [-1, -1]

    init(length: Int, forkAt: Int, seed: UInt64) {
        self.length = length
        self.forkAt = forkAt
        self.seed = seed
    }

    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        let p = try PatternSource(length: length, seed: seed).bytes(at: offset, count: count, scratch: scratch)
        if offset == forkAt && !forked, let scratch {
            forked = true
            _ = madvise(scratch, count, MADV_DOFORK)
            _ = pipe(&pipeFds)
            let (rd, wr) = (pipeFds[0], pipeFds[1])
            let pid = fork()
            if pid == 0 {
                // The child keeps the donor's pages until the parent closes the pipe (its own
                // copy of the write end closed first, or the read never sees the end). A
                // watchdog of its own: it never outlives the test by more than 30 s.
                close(wr)
                alarm(30)
                var b: UInt8 = 0
                _ = read(rd, &b, 1)
                _exit(0)
            }
            child = pid
            _ = madvise(scratch, count, MADV_DONTFORK)
        }
        return p
    }

    /// Lets the child exit and reaps it.
    func release() {
        guard child > 0 else { return }
        close(pipeFds[0])
        close(pipeFds[1])
        var status: Int32 = 0
        _ = waitpid(child, &status, 0)
        child = -1
    }
}
