import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// Copy, zero-fill and readahead policies end to end: 64 MiB touched by several threads,
/// contents verified.
final class CopyPolicyTests: XCTestCase {
    let size = 64 * MiB
    let threads = 4

    func testZeroFillAnonymous() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let s = try Session(r, options: { var o = FaultHandler.Options(); o.readers = 2; return o }()) { _ in
            ZeroFillPolicy(region: r)
        }
        let base = r.address, size = self.size, threads = self.threads
        let sum = Box<UInt64>(1)
        s.run { sum.update { $0 = touch(base, length: size, threads: threads) } }
        let st = s.finish()
        XCTAssertEqual(sum.value, 0)
        XCTAssertEqual(wordSum(r.pointer, size), 0)
        XCTAssertEqual(st.missingFaults, UInt64(size / basePageSize), "\(st)")
        XCTAssertEqual(st.resolutions[.zeropage], UInt64(size / basePageSize))
        XCTAssertEqual(st.bytes, UInt64(size))
        XCTAssertEqual(st.latency.totalCount, UInt64(size / basePageSize))
        XCTAssertTrue(s.handler.failures().isEmpty)
    }

    func testCopyFromMemoryAnonymousTwoReaders() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let src = MemorySource(length: size) { fillPattern($0.baseAddress!, $0.count, seed: 1) }
        var o = FaultHandler.Options()
        o.readers = 2
        o.cpus = [0, 1]
        let s = try Session(r, options: o) { _ in CopyPolicy(region: r, source: src) }
        let base = r.address, size = self.size, threads = self.threads
        let sum = Box<UInt64>(0)
        s.run { sum.update { $0 = touch(base, length: size, threads: threads) } }
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, src.buffer.baseAddress!, size), 0, "contents differ from the source")
        XCTAssertEqual(sum.value, touchSumExpected(src.buffer.baseAddress!, size))
        XCTAssertEqual(st.missingFaults, UInt64(size / basePageSize))
        XCTAssertEqual(st.resolutions[.copy], UInt64(size / basePageSize))
        XCTAssertEqual(st.fallbacks + st.failures, 0)
    }

    func testCopyFromMemoryShmem() throws {
        try require([.missingShmem])
        let r = try MappedRegion(.shmem, length: size)
        let src = MemorySource(length: size) { fillPattern($0.baseAddress!, $0.count, seed: 2) }
        let s = try Session(r, features: [.missingShmem]) { _ in CopyPolicy(region: r, source: src) }
        let base = r.address, size = self.size, threads = self.threads
        s.run { _ = touch(base, length: size, threads: threads) }
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, src.buffer.baseAddress!, size), 0)
        XCTAssertEqual(memcmp(r.alias!, src.buffer.baseAddress!, size), 0, "the page cache holds the copied pages")
        XCTAssertEqual(st.resolutions[.copy], UInt64(size / basePageSize))
    }

    func testLazyFileLoadWithUnalignedTail() throws {
        let tail = 1234
        let fileSize = size + tail
        let path = NSTemporaryDirectory() + "uffdkit-file-\(getpid()).img"
        defer { unlink(path) }
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size + basePageSize, alignment: basePageSize)
        defer { expected.deallocate() }
        memset(expected, 0, size + basePageSize)
        fillPattern(expected, fileSize / 8 * 8, seed: 3)
        memset(expected + fileSize / 8 * 8, 0x77, fileSize - fileSize / 8 * 8)
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes: expected, count: fileSize))
        let src = try FileSource(path: path)
        XCTAssertEqual(src.length, fileSize)
        let length = (fileSize + basePageSize - 1) / basePageSize * basePageSize
        let r = try MappedRegion(.anonymous(), length: length)
        var o = FaultHandler.Options()
        o.readers = 2
        let s = try Session(r, options: o) { _ in CopyPolicy(region: r, source: src) }
        let base = r.address, threads = self.threads
        s.run { _ = touch(base, length: length, threads: threads) }
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0, "file contents (and zero tail) differ")
        XCTAssertEqual((r.pointer + fileSize).load(as: UInt8.self), 0)
        XCTAssertEqual(st.resolutions[.copy], UInt64(length / basePageSize))
    }

    func testFileSourceMissingFileIsAnActionableError() {
        XCTAssertThrowsError(try FileSource(path: "/nonexistent/uffdkit")) { e in
            let e = e as! UffdError
            XCTAssertEqual(e.operation, .source)
            XCTAssertEqual(e.errno, .noSuchFileOrDirectory)
            XCTAssertTrue(e.description.contains("/nonexistent/uffdkit"))
        }
    }

    func testFixedReadaheadFromPatternSource() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let src = PatternSource(length: size, seed: 4)
        let pages = 16
        let s = try Session(r) { _ in
            ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .fixed(pages: pages))
        }
        let base = r.address, size = self.size, threads = self.threads
        s.run { _ = touch(base, length: size, threads: threads) }
        let st = s.finish()
        verifyPattern(r.pointer, size, seed: 4)
        // Each fault maps a window of up to 16 pages (racing threads and EEXIST shorten some).
        XCTAssertLessThan(st.missingFaults, UInt64(size / basePageSize / 4), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    func testAdaptiveReadaheadGrowsWhenSequentialAndClipsToRange() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let src = PatternSource(length: size, seed: 5)
        let ra = ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .adaptive(minPages: 1, maxPages: 64))
        let s = try Session(r) { _ in ra }
        let base = r.address, size = self.size
        // One thread, sequential: the window doubles up to 64 pages.
        s.run { _ = touch(base, length: size, threads: 1) }
        let st = s.finish()
        verifyPattern(r.pointer, size, seed: 5)
        XCTAssertEqual(ra.currentWindowPages, 64)
        XCTAssertLessThan(st.missingFaults, UInt64(size / basePageSize / 32), "\(st)")
        XCTAssertEqual(st.bytes, UInt64(size), "windows are clipped to the range: \(st)")
    }

    func testAdaptiveReadaheadFollowsSeveralSequentialThreads() throws {
        let r = try MappedRegion(.anonymous(), length: size)
        let src = PatternSource(length: size, seed: 6)
        let ra = ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .adaptive(minPages: 1, maxPages: 64))
        let s = try Session(r) { _ in ra }
        let base = r.address, size = self.size
        // Four threads, each sequential through its own 1 MiB chunks: four streams, each growing
        // its own window (1, 2, 4 ... 64 pages: about 9 faults per chunk of 256 pages). A single
        // shared window keeps resetting to one page instead.
        s.run { _ = touch(base, length: size, threads: 4) }
        let st = s.finish()
        verifyPattern(r.pointer, size, seed: 6)
        XCTAssertLessThan(st.missingFaults, UInt64(size / basePageSize / 16), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    func testAdaptiveReadaheadShrinksOnRandomAccess() throws {
        let len = 8 * MiB
        let r = try MappedRegion(.anonymous(), length: len)
        let ra = ReadaheadPolicy(ZeroFillPolicy(region: r), window: .adaptive(minPages: 1, maxPages: 32))
        let s = try Session(r) { _ in ra }
        let base = r.address
        let pages = len / basePageSize
        s.run {
            // Pages visited in a stride that is never sequential.
            var sum: UInt64 = 0
            var p = 0
            for _ in 0..<256 {
                p = (p + 977) % pages
                sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(p * basePageSize))!.pointee)
            }
            XCTAssertEqual(sum, 0)
        }
        let st = s.finish()
        XCTAssertEqual(ra.currentWindowPages, 1)
        XCTAssertGreaterThan(st.missingFaults, 200, "\(st)")
    }
}

/// Sum of the bytes `touch` reads (one per page).
func touchSumExpected(_ p: UnsafeRawPointer, _ length: Int) -> UInt64 {
    var s: UInt64 = 0
    var off = 0
    while off < length { s &+= UInt64(p.load(fromByteOffset: off, as: UInt8.self)); off += basePageSize }
    return s
}

/// Asserts every word of `[p, p+length)` is the pattern.
func verifyPattern(_ p: UnsafeRawPointer, _ length: Int, seed: UInt64, offset: Int = 0,
                   file: StaticString = #filePath, line: UInt = #line) {
    let w = p.assumingMemoryBound(to: UInt64.self)
    for i in 0..<(length / 8) where w[i] != PatternSource.word(at: offset + i * 8, seed: seed) {
        XCTFail("word \(i) (byte \(i * 8)) differs from the pattern", file: file, line: line)
        return
    }
}
