import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
@testable import UffdKit

/// The serve path on tmpfs (issue 14): a `.mapped` FileSource and a MemoryFileMapping have the
/// file's pages in the page cache mapped at open (a COPY otherwise maps its source pages on the
/// fault path); holes stay holes, a cold file on disk is not read up front, and a file
/// truncated under the populated mapping still gets the fallback. Every test checks every
/// byte of the loaded region and runs its faulting code under a watchdog.
final class MappedSourcePopulateTests: XCTestCase {
    var paths: [String] = []

    override func tearDown() {
        paths.forEach { unlink($0) }
    }

    /// A file in `dir` with `size` bytes of the pattern (seeded), or nil when `dir` is missing.
    func makeFile(in dir: String, size: Int, seed: UInt64) throws -> String {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
            throw XCTSkip("\(dir) is not here")
        }
        let path = dir + "/uffdkit-populate-\(getpid())-\(seed).img"
        let buf = UnsafeMutableRawPointer.allocate(byteCount: size + 8, alignment: 8)
        defer { buf.deallocate() }
        fillPattern(buf, size + 8, seed: seed)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes: buf, count: size)))
        paths.append(path)
        return path
    }

    /// Whether `dir` is a tmpfs (cuffd_fd_in_memory on the directory).
    func inMemory(_ dir: String) -> Bool {
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return cuffd_fd_in_memory(fd) == 1
    }

    func tmpfsOrSkip() throws -> String {
        guard inMemory("/dev/shm") else { throw XCTSkip("/dev/shm is not tmpfs here") }
        return "/dev/shm"
    }

    /// Whether the page at `addr` is mapped in this process (/proc/self/pagemap bit 63).
    func present(_ addr: UInt) -> Bool {
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var e: UInt64 = 0
        let n = pread(fd, &e, 8, off_t(addr / UInt(basePageSize) * 8))
        return n == 8 && e & (1 << 63) != 0
    }

    /// Loads `length` bytes through ReadaheadPolicy(CopyPolicy(src)) with 2 threads; returns the
    /// region, the failures and the stats.
    func load(_ src: FileSource, length: Int, window: Int = 64) throws -> (MappedRegion, [HandlerFailure], HandlerStats) {
        let r = try MappedRegion(.anonymous(), length: length)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        o.failureLogCapacity = 64
        let s = try Session(r, options: o) { _ in
            ReadaheadPolicy(CopyPolicy(region: r, source: src), window: .fixed(pages: window))
        }
        let base = r.address
        XCTAssertTrue(s.run(30) { _ = touch(base, length: length, threads: 2) })
        let failures = s.handler.failures()
        return (r, failures, s.finish())
    }

    /// A tmpfs file not a page multiple, shorter than the region: populated at open (every
    /// page of the mapping present before any copy), every byte copied, the tail zero.
    func testMappedTmpfsFileIsPopulatedAndCopiesEveryByte() throws {
        let size = 5 * MiB + 777, length = 6 * MiB
        let path = try makeFile(in: try tmpfsOrSkip(), size: size, seed: 31)
        let src = try FileSource(path: path, access: .mapped)
        XCTAssertEqual(src.access, .mapped)
        let mappedLength = (size + basePageSize - 1) / basePageSize * basePageSize
        XCTAssertEqual(src.populatedBytes, mappedLength)
        let base = UInt(bitPattern: try src.bytes(at: 0, count: basePageSize, scratch: nil))
        for page in [0, 1, 700, mappedLength / basePageSize - 1] {
            XCTAssertTrue(present(base + UInt(page * basePageSize)), "page \(page) of the mapping is mapped at open")
        }
        let (r, failures, st) = try load(src, length: length)
        XCTAssertEqual(failures.count, 0, "\(failures)")
        XCTAssertEqual(st.fallbacks, 0)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: basePageSize)
        defer { expected.deallocate() }
        memset(expected, 0, length)
        fillPattern(expected, size + 8, seed: 31)
        memset(expected + size, 0, length - size)
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0)
    }

    /// `populate: false` keeps the mapping lazy (and still copies every byte).
    func testMappedTmpfsFileWithoutPopulateStaysLazy() throws {
        let size = 2 * MiB
        let path = try makeFile(in: try tmpfsOrSkip(), size: size, seed: 32)
        let src = try FileSource(path: path, access: .mapped, populate: false)
        XCTAssertEqual(src.populatedBytes, 0)
        XCTAssertFalse(present(UInt(bitPattern: try src.bytes(at: MiB, count: basePageSize, scratch: nil))))
        let (r, failures, _) = try load(src, length: size)
        XCTAssertEqual(failures.count, 0)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { expected.deallocate() }
        fillPattern(expected, size, seed: 32)
        XCTAssertEqual(memcmp(r.pointer, expected, size), 0)
    }

    /// A sparse tmpfs file: only its data is mapped at open; its holes get no pages (a read
    /// fault on a tmpfs hole would allocate one), and they load as zeros.
    func testSparseTmpfsFilePopulatesOnlyItsData() throws {
        let dir = try tmpfsOrSkip()
        let path = dir + "/uffdkit-populate-\(getpid())-sparse.img"
        paths.append(path)
        let length = 16 * MiB
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(ftruncate(fd, off_t(length)), 0)
        let data = UnsafeMutableRawPointer.allocate(byteCount: MiB, alignment: basePageSize)
        defer { data.deallocate() }
        fillPattern(data, MiB, seed: 33)
        XCTAssertEqual(pwrite(fd, data, MiB, off_t(4 * MiB)), MiB)
        XCTAssertEqual(pwrite(fd, data, 100, off_t(length - 100)), 100)
        var before = stat()
        XCTAssertEqual(fstat(fd, &before), 0)
        let src = try FileSource(path: path, access: .mapped)
        var after = stat()
        XCTAssertEqual(fstat(fd, &after), 0)
        XCTAssertEqual(after.st_blocks, before.st_blocks, "populating allocated pages for the holes")
        XCTAssertEqual(src.populatedBytes, MiB + basePageSize, "the 1 MiB extent and the last page")
        let base = UInt(bitPattern: try src.bytes(at: 0, count: basePageSize, scratch: nil))
        XCTAssertTrue(present(base + UInt(4 * MiB)))
        XCTAssertFalse(present(base + UInt(8 * MiB)), "a hole is not mapped")
        let (r, failures, _) = try load(src, length: length)
        XCTAssertEqual(failures.count, 0)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: basePageSize)
        defer { expected.deallocate() }
        memset(expected, 0, length)
        memcpy(expected + 4 * MiB, data, MiB)
        memcpy(expected + length - 100, data, 100)
        XCTAssertEqual(memcmp(r.pointer, expected, length), 0)
    }

    /// A file on disk: what the page cache holds is mapped at open (all of a file just
    /// written), a cold file nothing (populating it would read all of it up front), and both
    /// load every byte.
    func testMappedDiskFilePopulatesOnlyWhatThePageCacheHolds() throws {
        let dir = "/var/tmp"
        guard !inMemory(dir) else { throw XCTSkip("\(dir) is tmpfs here") }
        let size = 2 * MiB
        let path = try makeFile(in: dir, size: size, seed: 34)
        do {
            // (Released before the cache is dropped: DONTNEED leaves mapped pages alone.)
            let warm = try FileSource(path: path, access: .mapped)
            XCTAssertEqual(warm.populatedBytes, size, "a file just written is in the page cache")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(fdatasync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        let cold = try FileSource(path: path, access: .mapped)
        XCTAssertEqual(cold.populatedBytes, 0, "a cold file is not read up front")
        XCTAssertFalse(present(UInt(bitPattern: try cold.bytes(at: MiB, count: basePageSize, scratch: nil))))
        let coldMap = try MemoryFileMapping(fd: fd, length: size)
        XCTAssertTrue(coldMap.waitForPopulate(timeout: 30))
        XCTAssertEqual(coldMap.populatedBytes, 0)
        XCTAssertEqual(coldMap.populateOutcome?.error, nil)
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { expected.deallocate() }
        fillPattern(expected, size, seed: 34)
        let (r, failures, _) = try load(cold, length: size)
        XCTAssertEqual(failures.count, 0)
        XCTAssertEqual(memcmp(r.pointer, expected, size), 0)
        // The load read the file in: opened again, it is populated.
        let warm = try FileSource(path: path, access: .mapped)
        XCTAssertEqual(warm.populatedBytes, size)
        for src in [warm] {
            let (r, failures, _) = try load(src, length: size)
            XCTAssertEqual(failures.count, 0)
            XCTAssertEqual(memcmp(r.pointer, expected, size), 0)
        }
    }

    /// A tmpfs file truncated under the populated mapping: the kernel unmaps the pages past the
    /// new end, the COPY of those fails (EFAULT) and the fallback resolves them (zeros here), the
    /// failures are reported, nothing crashes or hangs, and the pages before the end are right.
    func testTmpfsFileTruncatedUnderPopulatedMappingFallsBack() throws {
        let size = 4 * MiB
        let path = try makeFile(in: try tmpfsOrSkip(), size: size, seed: 35)
        let src = try FileSource(path: path, access: .mapped)
        XCTAssertEqual(src.populatedBytes, size)
        XCTAssertEqual(truncate(path, off_t(size / 2)), 0)
        let (r, failures, st) = try load(src, length: size, window: 16)
        XCTAssertGreaterThan(st.fallbacks, 0, "the pages past the new end get the fallback")
        XCTAssertGreaterThan(failures.count, 0)
        XCTAssertTrue(failures.allSatisfy { $0.errno == .badAddress && $0.recoveredByFallback }, "\(failures.prefix(3))")
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { expected.deallocate() }
        memset(expected, 0, size)
        fillPattern(expected, size / 2, seed: 35)
        XCTAssertEqual(memcmp(r.pointer, expected, size), 0)
    }

    /// The serve path's mapping: a tmpfs memory file is populated at start-up unless asked not to.
    func testMemoryFileMappingPopulatesTmpfsFile() throws {
        let size = 3 * MiB
        let path = try makeFile(in: try tmpfsOrSkip(), size: size, seed: 36)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let map = try MemoryFileMapping(fd: fd, length: size, populate: .now)
        XCTAssertEqual(map.populatedBytes, size)
        XCTAssertEqual(map.populateOutcome?.bytes, size)
        XCTAssertTrue(present(map.address + UInt(size - basePageSize)))
        let lazy = try MemoryFileMapping(fd: fd, length: size, populate: .none)
        XCTAssertEqual(lazy.populatedBytes, 0)
        XCTAssertTrue(lazy.waitForPopulate(timeout: 0))
        XCTAssertNil(lazy.populateOutcome)
        XCTAssertFalse(present(lazy.address + UInt(MiB)))
        // Every byte through the mapping the server copies from.
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { expected.deallocate() }
        fillPattern(expected, size, seed: 36)
        XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: map.address)!, expected, size), 0)
    }

    /// The default, a populate on a thread of its own: it maps what the synchronous one maps (a
    /// tmpfs file with a hole: its data, not the hole), on another thread, reports it once, and
    /// every byte reads right through the mapping.
    func testMemoryFileMappingBackgroundPopulateMatchesSynchronous() throws {
        let data = 8 * MiB, size = 12 * MiB
        let path = try makeFile(in: try tmpfsOrSkip(), size: data, seed: 37)
        XCTAssertEqual(truncate(path, off_t(size)), 0) // a 4 MiB hole at the end
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let now = try MemoryFileMapping(fd: fd, length: size, populate: .now)
        XCTAssertEqual(now.populatedBytes, data)
        let caller = cuffd_gettid()
        let reports = Mutex<[(MemoryFileMapping.PopulateOutcome, pid_t)]>([])
        let bg = try MemoryFileMapping(fd: fd, length: size) { o in reports.withLock { $0.append((o, cuffd_gettid())) } }
        XCTAssertEqual(bg.populate, .background)
        XCTAssertTrue(bg.waitForPopulate(timeout: 30), "the populate of 8 MiB did not end within 30 s")
        XCTAssertEqual(bg.populatedBytes, now.populatedBytes)
        XCTAssertEqual(bg.populateOutcome?.bytes, data)
        XCTAssertNil(bg.populateOutcome?.error)
        let got = reports.withLock { $0 }
        XCTAssertEqual(got.count, 1)
        XCTAssertEqual(got.first?.0, bg.populateOutcome)
        XCTAssertNotEqual(got.first?.1, caller, "reported from the populate thread")
        XCTAssertTrue(present(bg.address + UInt(data - basePageSize)))
        XCTAssertFalse(present(bg.address + UInt(data)), "the hole is not allocated or mapped")
        XCTAssertTrue(bg.waitForPopulate(timeout: 0), "waiting again returns at once")
        let expected = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { expected.deallocate() }
        memset(expected, 0, size)
        fillPattern(expected, data, seed: 37)
        XCTAssertEqual(memcmp(UnsafeRawPointer(bitPattern: bg.address)!, expected, size), 0)
    }

    /// Releasing the mapping while a long populate runs (512 MiB of resident tmpfs pages,
    /// ~40-200 ms to map here) stops it between runs and joins it: the release returns promptly,
    /// the populate reports `.canceled` with fewer bytes than the file's.
    func testMemoryFileMappingDeinitStopsBackgroundPopulatePromptly() throws {
        let size = 512 * MiB
        let dir = try tmpfsOrSkip()
        guard availableMemory() > 3 * size else { throw XCTSkip("needs \(3 * size >> 20) MiB available for a 512 MiB tmpfs file, has \(availableMemory() >> 20) MiB") }
        let path = dir + "/uffdkit-populate-\(getpid())-big.img"
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        paths.append(path)
        defer { close(fd) }
        // Written, so every page is in the page cache (fallocated tmpfs pages are not: mincore
        // does not count them and nothing is populated).
        try writeFiller(fd, from: 0, to: size)
        // Released once the populate has mapped its first run (it has ~7/8 of the file left):
        // a populate that ended before the release (this thread descheduled that long) is tried
        // again, a populate that ran to its end despite the release fails.
        var stopped: MemoryFileMapping.PopulateOutcome?
        for _ in 0..<3 where stopped == nil {
            let reports = Mutex<[MemoryFileMapping.PopulateOutcome]>([])
            var t0 = UInt64(0)
            var sawProgress = false
            do {
                let map = try MemoryFileMapping(fd: fd, length: size) { o in reports.withLock { $0.append(o) } }
                let deadline = DispatchTime.now().uptimeNanoseconds + 30_000_000_000
                while map.populatedBytes == 0 && map.populateOutcome == nil && DispatchTime.now().uptimeNanoseconds < deadline { sched_yield() }
                sawProgress = map.populatedBytes > 0 && map.populateOutcome == nil
                t0 = DispatchTime.now().uptimeNanoseconds
            }
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            XCTAssertLessThan(seconds, 2, "releasing the mapping waited \(seconds) s for the populate")
            let got = reports.withLock { $0 }
            XCTAssertEqual(got.count, 1, "the populate reports once, also when stopped")
            guard let o = got.first else { break }
            if o.error == .canceled {
                XCTAssertTrue(sawProgress)
                XCTAssertGreaterThan(o.bytes, 0)
                XCTAssertLessThan(o.bytes, size)
                stopped = o
            } else {
                XCTAssertEqual(o.error, nil)
            }
        }
        XCTAssertNotNil(stopped, "three populates of 512 MiB ran to their end although the mapping was released after their first run")
        // A populate left to run maps it all (the same file, so the stop above was not for lack of pages).
        let full = try MemoryFileMapping(fd: fd, length: size)
        XCTAssertTrue(full.waitForPopulate(timeout: 60))
        XCTAssertEqual(full.populatedBytes, size)
    }

    /// Writes 0xA5 bytes into `[from, to)` of `fd`.
    func writeFiller(_ fd: Int32, from: Int, to: Int) throws {
        let chunk = 4 * MiB
        let buf = [UInt8](repeating: 0xA5, count: chunk)
        var off = from
        while off < to {
            let n = buf.withUnsafeBytes { pwrite(fd, $0.baseAddress, Swift.min(chunk, to - off), off_t(off)) }
            guard n > 0 else { throw XCTSkip("cannot write the big tmpfs file: errno \(errno)") }
            off += n
        }
    }

    /// MemAvailable from /proc/meminfo, in bytes (0 when unknown).
    func availableMemory() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return 0 }
        for line in s.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
        }
        return 0
    }
}
