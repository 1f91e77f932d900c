import CUffd
import CUffdNet
import Foundation
import TestServers
import XCTest
@testable import UffdKit

/// Remote and packed page sources against real servers on loopback (nginx, moto's S3 with
/// SigV4 verification, a misbehaving Python server): every restored byte is compared with the
/// image; every failure case ends with a decided outcome (the fallback for the affected pages,
/// the error to the owner, no thread left hanging: each restore runs under a watchdog).
final class RemoteSourceTests: XCTestCase {
    /// Options that fail fast in tests: short timeouts and backoff.
    func quick(retries: Int = 2, timeout: Double = 5, readahead: Int = 4, connections: Int = 4) -> RemoteOptions {
        var o = RemoteOptions()
        o.retries = retries
        o.requestTimeout = timeout
        o.connectTimeout = 2
        o.backoff = 0.02
        o.readaheadChunks = readahead
        o.maxConnections = connections
        o.cacheBytes = 32 << 20
        return o
    }

    struct Restore {
        let region: MappedRegion
        let stats: HandlerStats
        let failures: [HandlerFailure]
        let finished: Bool
    }

    /// Serves a region of the source's size (rounded up to the page) with CopyPolicy, touches
    /// every page from `threads` threads under a watchdog, stops. Faults the policy cannot
    /// resolve get the zero-fill fallback (so the threads go on and the test sees which).
    func restore(_ source: any PageSource, kind: MappedRegion.Kind = .anonymous(), threads: Int = 4,
                 midway: (@Sendable () -> Void)? = nil, file: StaticString = #filePath, line: UInt = #line) throws -> Restore {
        let page = kind == .hugetlb ? (hugePageSize ?? 2 << 20) : basePageSize
        let length = (source.length + page - 1) / page * page
        let region = try MappedRegion(kind, length: length)
        var o = FaultHandler.Options()
        o.readers = 2
        o.fallback = .zeroFill
        let features: Features = kind == .hugetlb ? [.missingHugetlbfs] : (kind == .shmem ? [.missingShmem] : [])
        let s = try Session(region, features: features, options: o) { _ in CopyPolicy(region: region, source: source) }
        let base = region.address
        let ok = s.run(60, file: file, line: line) {
            if let midway {
                _ = touch(base, length: length / 2, threads: threads, stride: page)
                midway()
                _ = touch(base + UInt(length / 2), length: length - length / 2, threads: threads, stride: page)
            } else {
                _ = touch(base, length: length, threads: threads, stride: page)
            }
        }
        let stats = s.finish()
        return Restore(region: region, stats: stats, failures: s.handler.failures(), finished: ok)
    }

    func assertBytes(_ r: Restore, _ image: Data, file: StaticString = #filePath, line: UInt = #line) {
        image.withUnsafeBytes { b in
            XCTAssertEqual(memcmp(r.region.pointer, b.baseAddress!, image.count), 0, "restored bytes differ from the image",
                           file: file, line: line)
        }
        let tail = r.region.length - image.count
        if tail > 0 {
            XCTAssertEqual(wordSum(r.region.pointer + image.count, tail & ~7), 0, "tail past the image is zero", file: file, line: line)
        }
    }

    func packed(_ image: Data) throws -> (raw: URL, packed: URL, dir: URL) {
        let dir = try makeTempDir("pack")
        let raw = dir.appendingPathComponent("img")
        let out = dir.appendingPathComponent("img.pak")
        try image.write(to: raw)
        _ = try PackedSnapshot.pack(raw.path, to: out.path)
        return (raw, out, dir)
    }

    // MARK: nginx

    /// A raw image and its packed form behind nginx: both restore byte for byte; the packed one
    /// maps zero chunks with ZEROPAGE and fetches one range per stored frame.
    func testNginxRawAndPackedRestoreEveryByte() throws {
        let nginx = try Nginx()
        let image = makeImage(chunks: 9)
        let (raw, pak, dir) = try packed(image)
        defer { try? FileManager.default.removeItem(at: dir) }
        try nginx.put("img", try Data(contentsOf: raw))
        try nginx.put("img.pak", try Data(contentsOf: pak))

        let rawSource = try PageSources.open(nginx.url("img"), options: quick())
        XCTAssertFalse((rawSource as! ChunkedSource).isPacked)
        XCTAssertFalse((rawSource as! ChunkedSource).etag.isEmpty, "nginx sends an ETag: it is pinned")
        let r1 = try restore(rawSource)
        XCTAssertTrue(r1.finished)
        assertBytes(r1, image)
        XCTAssertEqual(r1.stats.fallbacks + r1.stats.failures, 0, "\(r1.failures)")

        let pakSource = try PageSources.open(nginx.url("img.pak"), options: quick()) as! ChunkedSource
        XCTAssertTrue(pakSource.isPacked)
        let r2 = try restore(pakSource)
        XCTAssertTrue(r2.finished)
        assertBytes(r2, image)
        XCTAssertEqual(r2.stats.fallbacks + r2.stats.failures, 0, "\(r2.failures)")
        // Chunks 0, 3, 6 are zeros: 3 * 512 pages mapped with ZEROPAGE, never fetched.
        XCTAssertEqual(r2.stats.resolutions[.zeropage], UInt64(3 * (2 << 20) / basePageSize))
        let c = pakSource.counters
        // Open: 8 bytes of magic, the header, the index; then one request per stored frame (6 + tail).
        XCTAssertEqual(c.requests, 3 + 7, "\(c)")
        XCTAssertEqual(c.retries, 0)
    }

    /// Shmem memory from a packed snapshot behind nginx.
    func testNginxPackedRestoreShmem() throws {
        try require([.missingShmem])
        let nginx = try Nginx()
        let image = makeImage(chunks: 5, tail: 0)
        let (_, pak, dir) = try packed(image)
        defer { try? FileManager.default.removeItem(at: dir) }
        try nginx.put("s.pak", try Data(contentsOf: pak))
        let r = try restore(try PageSources.open(nginx.url("s.pak"), options: quick()), kind: .shmem)
        XCTAssertTrue(r.finished)
        assertBytes(r, image)
        XCTAssertEqual(r.stats.fallbacks, 0)
    }

    /// hugetlb has no zero page: the zero chunks of a packed snapshot are a COPY of zeros.
    func testPackedRestoreHugetlbZeroChunksAreCopies() throws {
        try require([.missingHugetlbfs])
        let image = makeImage(chunks: 6, tail: 0)
        let (_, pak, dir) = try packed(image)
        defer { try? FileManager.default.removeItem(at: dir) }
        let ran = try withHugePages(6) {
            let source = try PageSources.open(pak.path)
            let r = try restore(source, kind: .hugetlb, threads: 2)
            XCTAssertTrue(r.finished)
            assertBytes(r, image)
            XCTAssertEqual(r.stats.fallbacks, 0, "\(r.failures)")
            XCTAssertEqual(r.stats.resolutions[.copy], 6)
            XCTAssertEqual(r.stats.resolutions[.zeropage] ?? 0, 0)
        }
        if !ran { throw XCTSkip("no huge pages could be reserved") }
    }

    /// 404, 403, a refused connection and an unknown host fail at open with one actionable line.
    func testOpenErrorsAreActionable() throws {
        let nginx = try Nginx()
        try nginx.put("denied/x", Data([1, 2, 3]))
        func openError(_ spec: String) -> UffdError? {
            do { _ = try PageSources.open(spec, options: quick(retries: 0)); return nil } catch { return error }
        }
        let e404 = openError(nginx.url("missing"))
        XCTAssertEqual(e404?.errno, .noSuchFileOrDirectory)
        XCTAssertTrue(e404?.detail.contains("not found (HTTP 404)") ?? false, "\(String(describing: e404))")
        let e403 = openError(nginx.url("denied/x"))
        XCTAssertEqual(e403?.errno, .permissionDenied)
        XCTAssertTrue(e403?.detail.contains("access denied (HTTP 403)") ?? false, "\(String(describing: e403))")
        let refused = openError("http://127.0.0.1:\(freePort())/img")
        XCTAssertEqual(refused?.errno, .connectionRefused)
        XCTAssertTrue(refused?.detail.contains("is the server running") ?? false, "\(String(describing: refused))")
        let dns = openError("http://uffdkit-no-such-host.invalid/img")
        XCTAssertEqual(dns?.errno, .noRouteToHost)
        XCTAssertTrue(dns?.detail.contains("cannot resolve host") ?? false, "\(String(describing: dns))")
        let scheme = openError("ftp://example.com/x")
        XCTAssertEqual(scheme?.operation, .argument)
        let s3 = openError("s3://bucket-only")
        XCTAssertTrue(s3?.detail.contains("s3://BUCKET/KEY") ?? false, "\(String(describing: s3))")
    }

    /// nginx is stopped mid-restore: the pages already fetched are right, the rest get the
    /// fallback (zeros here), the owner gets failures naming the refused connection, and every
    /// faulting thread finishes.
    func testServerStoppedMidRestore() throws {
        let nginx = try Nginx()
        let image = makeImage(chunks: 8, zeroEvery: 100, tail: 0)
        try nginx.put("img", image)
        let source = try PageSources.open(nginx.url("img"), options: quick(retries: 1, readahead: 0))
        let r = try restore(source, threads: 2, midway: { nginx.stop() })
        XCTAssertTrue(r.finished, "no faulting thread hangs")
        let half = image.count / 2
        image.withUnsafeBytes { b in
            XCTAssertEqual(memcmp(r.region.pointer, b.baseAddress!, half), 0, "pages fetched before the stop are right")
        }
        XCTAssertEqual(wordSum(r.region.pointer + half, half), 0, "pages after the stop got the zero-fill fallback")
        XCTAssertEqual(r.stats.fallbacks, UInt64(half / basePageSize))
        XCTAssertFalse(r.failures.isEmpty)
        let text = r.failures.first.map { "\($0)" } ?? ""
        XCTAssertTrue(text.contains("refused") || text.contains("dropped"), text)
    }

    // MARK: misbehaving server

    func image(_ chunks: Int = 4) throws -> (Data, URL, URL) {
        let dir = try makeTempDir("img")
        let img = makeImage(chunks: chunks, zeroEvery: 100, tail: 0)
        let url = dir.appendingPathComponent("img")
        try img.write(to: url)
        return (img, url, dir)
    }

    /// Reads one chunk through a fresh source at `spec`; returns the error (nil on success).
    func readError(_ spec: String, options: RemoteOptions, chunk: Int = 0) -> UffdError? {
        do {
            let s = try PageSources.open(spec, options: options) as! ChunkedSource
            let buf = UnsafeMutableRawPointer.allocate(byteCount: s.chunkSize, alignment: 4096)
            defer { buf.deallocate() }
            _ = try s.bytesTyped(at: chunk * s.chunkSize, count: s.chunkSize, scratch: buf)
            return nil
        } catch {
            return error
        }
    }

    /// Truncated bodies are retried, then reported as truncated; over-long ones and a server that
    /// ignores Range are wrong-length errors; the bytes never reach memory.
    func testTruncatedAndWrongLengthResponses() throws {
        let (_, file, dir) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        let t = readError(server.url("truncate"), options: quick(retries: 2))
        XCTAssertEqual(t?.errno, .protocolError)
        XCTAssertTrue(t?.detail.contains("truncated") ?? false, "\(String(describing: t))")
        XCTAssertTrue(t?.detail.contains("after 3 attempts") ?? false, "\(String(describing: t))")
        let l = readError(server.url("long"), options: quick())
        XCTAssertEqual(l?.errno, .protocolError)
        XCTAssertTrue(l?.detail.contains("wrong-length") ?? false, "\(String(describing: l))")
        let n = readError(server.url("norange"), options: quick())
        XCTAssertEqual(n?.errno, .protocolError)
        XCTAssertTrue(n?.detail.contains("ignored the Range") ?? false, "\(String(describing: n))")

        // In a restore: the affected pages get the fallback, the owner gets the reason.
        let source = try PageSources.open(server.url("truncate"), options: quick(retries: 1))
        let r = try restore(source, threads: 2)
        XCTAssertTrue(r.finished)
        XCTAssertEqual(r.stats.fallbacks, UInt64(source.length / basePageSize))
        XCTAssertEqual(wordSum(r.region.pointer, r.region.length), 0, "no partial body reached memory")
        XCTAssertTrue(r.failures.contains { "\($0)".contains("truncated") }, "\(r.failures.first.map { "\($0)" } ?? "")")
    }

    /// 5xx answers are retried with backoff and the restore succeeds.
    func testServerErrorsAreRetried() throws {
        let (img, file, dir) = try image()
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        let source = try PageSources.open(server.url("flaky"), options: quick(retries: 2)) as! ChunkedSource
        let r = try restore(source)
        XCTAssertTrue(r.finished)
        assertBytes(r, img)
        XCTAssertEqual(r.stats.fallbacks, 0, "\(r.failures)")
        XCTAssertGreaterThan(source.counters.retries, 0)
        // Without retries the same server fails with the status.
        let e = readError(server.url("flaky"), options: quick(retries: 0), chunk: 1)
        XCTAssertEqual(e?.errno, .ioError)
        XCTAssertTrue(e?.detail.contains("HTTP 503") ?? false, "\(String(describing: e))")
    }

    /// A server slower than the request deadline: the request times out (each attempt), the
    /// read fails with ETIMEDOUT in bounded time, the restore's pages get the fallback.
    func testSlowServerHitsTheDeadline() throws {
        let (_, file, dir) = try image(2)
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        let start = Date()
        let e = readError(server.url("slow-3000"), options: quick(retries: 1, timeout: 0.3))
        let took = Date().timeIntervalSince(start)
        XCTAssertEqual(e?.errno, .timedOut)
        XCTAssertTrue(e?.detail.contains("timeout") ?? false, "\(String(describing: e))")
        XCTAssertLessThan(took, 2.5, "two 0.3 s attempts, not the server's 3 s")

        let source = try PageSources.open(server.url("slow-3000"), options: quick(retries: 0, timeout: 0.3))
        let r = try restore(source, threads: 2)
        XCTAssertTrue(r.finished)
        XCTAssertEqual(r.stats.fallbacks, UInt64(source.length / basePageSize))
        XCTAssertTrue(r.failures.contains { "\($0)".contains("timeout") })
    }

    /// The object is replaced mid-restore: with If-Match honoured (412) and with If-Match
    /// ignored (a different ETag in the reply), the new version's bytes never reach memory.
    func testObjectReplacedMidRestoreIsAnError() throws {
        let (img, file, dir) = try image(6)
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        for mode in ["replace-2", "replace-ignore-2"] {
            // Two chunk fetches of the first version (after the 8-byte magic probe), then the new one.
            let source = try PageSources.open(server.url(mode), options: quick(retries: 0, readahead: 0))
            let r = try restore(source, threads: 1)
            XCTAssertTrue(r.finished)
            let chunk = 2 << 20
            img.withUnsafeBytes { b in
                XCTAssertEqual(memcmp(r.region.pointer, b.baseAddress!, chunk), 0, "\(mode): first version's chunk")
            }
            XCTAssertEqual(wordSum(r.region.pointer + 2 * chunk, 4 * chunk), 0, "\(mode): nothing of the new version")
            XCTAssertEqual(r.stats.fallbacks, UInt64(4 * chunk / basePageSize), mode)
            XCTAssertTrue(r.failures.contains { "\($0)".contains("changed since it was opened") },
                          "\(mode): \(r.failures.first.map { "\($0)" } ?? "")")
        }
    }

    /// Eight threads fault on the same chunk behind a 300 ms server: one request, the others
    /// join it (single flight) and all are woken together.
    func testSingleFlight() throws {
        let (img, file, dir) = try image(1)
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        let source = try PageSources.open(server.url("latency-300"), options: quick(readahead: 0)) as! ChunkedSource
        let before = source.counters.requests
        let region = try MappedRegion(.anonymous(), length: img.count)
        var o = FaultHandler.Options()
        o.readers = 8
        o.fallback = .zeroFill
        let s = try Session(region, options: o) { _ in CopyPolicy(region: region, source: source) }
        let base = region.address
        s.run {
            // 8 threads, each on its own page of the one chunk.
            let threads = (0..<8).map { i in
                Thread { _ = touch(base + UInt(i * 64 * basePageSize), length: basePageSize, threads: 1) }
            }
            threads.forEach { $0.start() }
            while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        }
        let st = s.finish()
        XCTAssertEqual(st.fallbacks, 0)
        XCTAssertEqual(source.counters.requests - before, 1, "one fetch for the chunk: \(source.counters)")
        XCTAssertGreaterThan(source.counters.joined, 0, "\(source.counters)")
        img.withUnsafeBytes { b in
            for i in 0..<8 {
                XCTAssertEqual(memcmp(region.pointer + i * 64 * basePageSize, b.baseAddress! + i * 64 * basePageSize, basePageSize), 0)
            }
        }
    }

    /// The deferred-resolution building block: prefetch completes on the fetcher thread, joins
    /// a fetch in flight, and completes at once for a cached or zero chunk.
    func testPrefetchCallbacks() throws {
        let (img, file, dir) = try image(3)
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try MisbehavingServer(serving: file)
        let source = try PageSources.open(server.url("latency-100"), options: quick(readahead: 0)) as! ChunkedSource
        final class Done: @unchecked Sendable {
            let sem = DispatchSemaphore(value: 0)
            var results: [Int32] = []
            let lock = NSLock()
        }
        let done = Done()
        let ctx = Unmanaged.passRetained(done)
        defer { ctx.release() }
        let cb: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?) -> Void = { c, result, _ in
            let d = Unmanaged<Done>.fromOpaque(c!).takeUnretainedValue()
            d.lock.lock(); d.results.append(result); d.lock.unlock()
            d.sem.signal()
        }
        XCTAssertEqual(source.prefetch(chunk: 1, context: ctx.toOpaque(), done: cb), 0)
        XCTAssertEqual(source.prefetch(chunk: 1, context: ctx.toOpaque(), done: cb), 0)   // joins
        for _ in 0..<2 { XCTAssertEqual(done.sem.wait(timeout: .now() + 10), .success) }
        XCTAssertEqual(done.results, [0, 0])
        XCTAssertEqual(source.counters.joined, 1)
        let requests = source.counters.requests
        XCTAssertEqual(source.prefetch(chunk: 1, context: ctx.toOpaque(), done: cb), 0)   // cached: at once
        XCTAssertEqual(done.sem.wait(timeout: .now()), .success)
        XCTAssertEqual(source.counters.requests, requests)
        // The bytes are there without another request.
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 2 << 20, alignment: 4096)
        defer { buf.deallocate() }
        _ = try source.bytesTyped(at: 2 << 20, count: 2 << 20, scratch: buf)
        img.withUnsafeBytes { XCTAssertEqual(memcmp(buf, $0.baseAddress! + (2 << 20), 2 << 20), 0) }
        XCTAssertEqual(source.counters.requests, requests)
    }

    // MARK: packed snapshots

    /// pack/unpack round trip byte for byte; info matches; a corrupt frame is an error naming the
    /// frame (never wrong bytes), locally and over HTTP.
    func testPackedRoundTripAndCorruptFrame() throws {
        let image = makeImage(chunks: 7)
        let (raw, pak, dir) = try packed(image)
        defer { try? FileManager.default.removeItem(at: dir) }
        let info = try PackedSnapshot.info(pak.path)
        XCTAssertEqual(info.rawLength, image.count)
        XCTAssertEqual(info.chunks, 8)
        XCTAssertEqual(info.zeroChunks, 3)            // chunks 0, 3, 6
        XCTAssertGreaterThan(info.ratio, 1.3)
        let back = dir.appendingPathComponent("back")
        XCTAssertEqual(try PackedSnapshot.unpack(pak.path, to: back.path), image.count)
        XCTAssertEqual(try Data(contentsOf: back), try Data(contentsOf: raw))

        // Flip bytes inside frame 4's compressed data.
        let source = try PageSources.open(pak.path) as! ChunkedSource
        let entry = cunet_source_index(source.handle)![4]
        let fd = open(pak.path, O_RDWR)
        var junk = [UInt8](repeating: 0x5A, count: 64)
        XCTAssertEqual(pwrite(fd, &junk, 64, off_t(entry.offset) + off_t(entry.length / 2)), 64)
        close(fd)
        let corrupt = try PageSources.open(pak.path) as! ChunkedSource
        let r = try restore(corrupt, threads: 2)
        XCTAssertTrue(r.finished)
        let chunk = 2 << 20
        XCTAssertEqual(wordSum(r.region.pointer + 4 * chunk, chunk), 0, "frame 4's pages got the fallback, not wrong bytes")
        image.withUnsafeBytes { b in
            XCTAssertEqual(memcmp(r.region.pointer, b.baseAddress!, 4 * chunk), 0)
            XCTAssertEqual(memcmp(r.region.pointer + 5 * chunk, b.baseAddress! + 5 * chunk, image.count - 5 * chunk), 0)
        }
        XCTAssertEqual(r.stats.fallbacks, UInt64(chunk / basePageSize))
        XCTAssertTrue(r.failures.allSatisfy { "\($0)".contains("packed frame 4 is corrupt") }, "\(r.failures.first.map { "\($0)" } ?? "")")
        XCTAssertThrowsError(try PackedSnapshot.unpack(pak.path, to: back.path)) { e in
            XCTAssertTrue("\(e)".contains("packed frame 4 is corrupt"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: back.path), "a failed unpack leaves no partial file")

        let nginx = try Nginx()
        try nginx.put("bad.pak", try Data(contentsOf: pak))
        let remote = try PageSources.open(nginx.url("bad.pak"), options: quick()) as! ChunkedSource
        let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        XCTAssertThrowsError(try remote.bytesTyped(at: 4 * chunk, count: chunk, scratch: buf)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .badMessage)
            XCTAssertTrue("\(e)".contains("packed frame 4 is corrupt"), "\(e)")
        }
    }

    /// A truncated packed file or a damaged header/index is refused at open.
    func testDamagedPackedFileRefusedAtOpen() throws {
        let (_, pak, dir) = try packed(makeImage(chunks: 3))
        defer { try? FileManager.default.removeItem(at: dir) }
        let size = try FileManager.default.attributesOfItem(atPath: pak.path)[.size] as! Int
        XCTAssertEqual(truncate(pak.path, off_t(size - 10)), 0)
        XCTAssertThrowsError(try PageSources.open(pak.path)) { e in
            XCTAssertTrue("\(e)".contains("truncated or corrupt"), "\(e)")
        }
    }

    /// PageSources.open: a raw path is a FileSource, a packed path a ChunkedSource; shared()
    /// hands every caller naming the same image the same instance (one cache).
    func testPageSourcesNamesAndSharing() throws {
        let (raw, pak, dir) = try packed(makeImage(chunks: 2))
        defer { try? FileManager.default.removeItem(at: dir) }
        XCTAssertTrue(try PageSources.open(raw.path) is FileSource)
        XCTAssertTrue(try PageSources.open("file:" + raw.path) is FileSource)
        XCTAssertTrue(try PageSources.open(pak.path) is ChunkedSource)
        let a = try PageSources.shared(pak.path) as AnyObject
        let b = try PageSources.shared(pak.path) as AnyObject
        XCTAssertTrue(a === b)
        XCTAssertEqual(percentEncodePath("a b/c+d~é"), "a%20b/c%2Bd~%C3%A9")
    }

    // MARK: S3

    /// moto's S3 with SigV4 verification: raw and packed objects restore byte for byte with the
    /// right key; a wrong secret is a 403 at open naming the AWS variables.
    func testS3SigV4RestoreWithMoto() throws {
        let moto = try MotoS3()
        let image = makeImage(chunks: 5)
        let (raw, pak, dir) = try packed(image)
        defer { try? FileManager.default.removeItem(at: dir) }
        try moto.createBucket("snapshots")
        try moto.put("snapshots", "vm 1/mem", file: raw)
        try moto.put("snapshots", "vm 1/mem.pak", file: pak)
        moto.exportCredentials()
        var o = quick()
        o.endpoint = moto.endpoint
        for key in ["vm 1/mem", "vm 1/mem.pak"] {
            let source = try PageSources.open("s3://snapshots/\(key)", options: o)
            let r = try restore(source)
            XCTAssertTrue(r.finished)
            assertBytes(r, image)
            XCTAssertEqual(r.stats.fallbacks, 0, "\(key): \(r.failures)")
        }
        setenv("AWS_SECRET_ACCESS_KEY", "wrong", 1)
        defer { moto.exportCredentials() }
        XCTAssertThrowsError(try PageSources.open("s3://snapshots/vm 1/mem", options: o)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .permissionDenied)
            XCTAssertTrue("\(e)".contains("AWS_SECRET_ACCESS_KEY"), "\(e)")
        }
        unsetenv("AWS_ACCESS_KEY_ID")
        XCTAssertThrowsError(try PageSources.open("s3://snapshots/vm 1/mem", options: o)) { e in
            XCTAssertTrue("\(e)".contains("no credentials"), "\(e)")
        }
    }
}

/// ChunkedSource through the handler's deferred path (DeferredCopyPolicy): readers never wait
/// for the network; random faults from 8 threads over a 20 ms-latency server, every byte
/// verified; a dead server fails the chunks to the fallback with the reason.
final class RemoteDeferredTests: XCTestCase {
    func options(retries: Int = 1) -> RemoteOptions {
        var o = RemoteOptions()
        o.retries = retries
        o.requestTimeout = 5
        o.connectTimeout = 2
        o.backoff = 0.02
        o.readaheadChunks = 0
        o.maxConnections = 8
        o.cacheBytes = 64 << 20
        return o
    }

    func testDeferredRandomFaultsEveryByte() throws {
        let dir = try makeTempDir("deferred")
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = makeImage(chunks: 12, zeroEvery: 4, tail: 5000)
        let file = dir.appendingPathComponent("img")
        try image.write(to: file)
        let pak = dir.appendingPathComponent("img.pak")
        _ = try PackedSnapshot.pack(file.path, to: pak.path)
        let server = try MisbehavingServer(serving: file)
        let nginx = try Nginx()
        try nginx.put("img.pak", try Data(contentsOf: pak))
        for spec in [server.url("latency-20"), nginx.url("img.pak")] {
            let source = try PageSources.open(spec, options: options()) as! ChunkedSource
            let length = (source.length + basePageSize - 1) / basePageSize * basePageSize
            let r = try MappedRegion(.anonymous(), length: length)
            var o = FaultHandler.Options()
            o.fallback = .zeroFill
            let s = try Session(r, options: o) { _ in DeferredCopyPolicy(destination: r.address, source: source) }
            let base = r.address
            let ok = s.run(60) {
                DispatchQueue.concurrentPerform(iterations: 8) { t in
                    var g = SystemRandomNumberGenerator()
                    let pages = length / basePageSize
                    var sum = 0
                    for p in (0..<pages).filter({ $0 % 8 == t }).shuffled(using: &g) {
                        sum &+= Int(UnsafePointer<UInt8>(bitPattern: base + UInt(p * basePageSize))!.pointee)
                    }
                    if sum == -1 { print(sum) }
                }
            }
            let st = s.finish()
            XCTAssertTrue(ok, spec)
            XCTAssertEqual(st.fallbacks + st.failures, 0, "\(spec): \(s.handler.failures().first.map { "\($0)" } ?? "")")
            image.withUnsafeBytes { XCTAssertEqual(memcmp(r.pointer, $0.baseAddress!, image.count), 0, spec) }
            XCTAssertEqual(wordSum(r.pointer + image.count, (length - image.count) & ~7), 0)
            XCTAssertLessThanOrEqual(source.counters.misses, UInt64(12 + 1), "\(spec): one fetch per chunk: \(source.counters)")
        }
    }

    func testDeferredServerGoneFailsToFallback() throws {
        let dir = try makeTempDir("deferred")
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = makeImage(chunks: 4, zeroEvery: 100, tail: 0)
        let file = dir.appendingPathComponent("img")
        try image.write(to: file)
        let server = try MisbehavingServer(serving: file)
        let source = try PageSources.open(server.url("ok"), options: options(retries: 1)) as! ChunkedSource
        server.stop()
        let r = try MappedRegion(.anonymous(), length: image.count)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, options: o) { _ in DeferredCopyPolicy(destination: r.address, source: source) }
        let base = r.address, length = image.count
        let ok = s.run(60) { _ = touch(base, length: length, threads: 4) }
        let st = s.finish()
        XCTAssertTrue(ok, "no faulting thread hangs")
        XCTAssertEqual(wordSum(r.pointer, length), 0, "every chunk got the zero-fill fallback")
        XCTAssertGreaterThan(st.fallbacks, 0)
        let failure = s.handler.failures().first.map { "\($0)" } ?? ""
        XCTAssertTrue(failure.contains("refused") || failure.contains("dropped"), failure)
    }
}
