import Foundation
import Synchronization
import TestServers
import UffdKit
import XCTest

/// `uffdctl serve --memory-file` from remote and packed snapshots: nginx (raw and packed images
/// behind http://), moto's S3 (s3:// with SigV4), a local packed file; real uffds handed over by
/// `uffdctl handoff-client` processes, each of which verifies every byte it reads against the
/// raw memory file. Servers are started by each test (TestServers); one that cannot start here
/// skips the test with the reason.
final class ServeRemoteTests: XCTestCase {
    var dir: URL!
    var memFile: String { dir.appendingPathComponent("mem").path }
    var packedFile: String { dir.appendingPathComponent("mem.packed").path }
    var sock: String { dir.appendingPathComponent("s.sock").path }
    var servers: [BackgroundUffdctl] = []

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("serve-remote-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        // 16 MiB: random chunks (a wrong offset cannot pass), compressible halves and all-zero
        // chunks (the packed snapshot's ZEROPAGE path), no tail.
        try makeImage(chunks: 8, tail: 0).write(to: URL(fileURLWithPath: memFile))
        let r = try runUffdctl(["snapshot", "pack", memFile, packedFile], timeout: 60)
        XCTAssertEqual(r.code, 0, r.stderr)
    }

    override func tearDown() {
        servers.forEach { $0.stop() }
        try? FileManager.default.removeItem(at: dir)
    }

    func startServer(_ memory: String, _ extra: [String] = []) throws -> BackgroundUffdctl {
        let s = try BackgroundUffdctl(["serve", "--socket", sock, "--memory-file", memory] + extra, dir: dir, name: "server\(servers.count)")
        servers.append(s)
        XCTAssertTrue(s.waitFor("listening"), "server did not start: \(s.log)")
        return s
    }

    func client(_ extra: [String], name: String) throws -> BackgroundUffdctl {
        try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", memFile, "--timeout", "60"] + extra, dir: dir, name: name)
    }

    /// Three VMs at once from one server: chunk-aligned regions (the deferred path), a region at
    /// an offset that is not a chunk boundary (the synchronous path through the same cache), and
    /// kernel-mode faults; every byte verified by the clients; no fault got the fallback.
    func serveThreeClients(from memory: String, _ extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws {
        let server = try startServer(memory, extra)
        let clients = try [
            client(["--size", "8M", "--regions", "2", "--kernel-pages", "16"], name: "aligned"),
            client(["--size", "4M", "--offset", "12M"], name: "tail"),
            client(["--size", "1M", "--offset", "2060K"], name: "unaligned"),
        ]
        for c in clients {
            XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) \(c.log) server: \(server.log)", file: file, line: line)
            XCTAssertTrue(c.output.contains("\"ok\":true"), c.output, file: file, line: line)
        }
        XCTAssertTrue(server.waitFor("VM gone", count: 3), server.log, file: file, line: line)
        XCTAssertEqual(server.log.components(separatedBy: "fallbacks=0 ").count - 1, 3, server.log, file: file, line: line)
        XCTAssertTrue(server.log.contains("faults="), server.log, file: file, line: line)
    }

    func testServeFromNginxURLRawAndPacked() throws {
        let nginx = try Nginx()
        defer { nginx.stop() }
        try nginx.put("mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        try nginx.put("mem.packed", Data(contentsOf: URL(fileURLWithPath: packedFile)))
        try serveThreeClients(from: nginx.url("mem"))
        servers.forEach { $0.stop() }
        try serveThreeClients(from: nginx.url("mem.packed"))
    }

    /// One chunk cache for every VM restored from the same image: a second VM reading the same
    /// memory after the first is served without a single new request to the image server.
    func testServeFromURLSharesOneCacheAcrossVMs() throws {
        let nginx = try Nginx()
        defer { nginx.stop() }
        try nginx.put("mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        let server = try startServer(nginx.url("mem"))
        func requests(after gone: Int) -> Int? {
            let lines = server.log.split(separator: "\n").filter { $0.contains("VM gone") }
            guard lines.count >= gone, let r = lines[gone - 1].range(of: #"image_requests=(\d+)"#, options: .regularExpression) else { return nil }
            return Int(lines[gone - 1][r].split(separator: "=")[1])
        }
        for (i, name) in ["first", "second"].enumerated() {
            let c = try client(["--size", "8M", "--offset", "8M"], name: name)   // the image's end: no read-ahead in flight
            XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) server: \(server.log)")
            XCTAssertTrue(server.waitFor("VM gone", count: i + 1), server.log)
        }
        let first = try XCTUnwrap(requests(after: 1), server.log), second = try XCTUnwrap(requests(after: 2), server.log)
        XCTAssertGreaterThan(first, 0, server.log)
        XCTAssertEqual(first, second, "the second VM should be served from the shared cache: \(server.log)")
    }

    /// The library: `SnapshotServer.Configuration(source:)` with the shared source of a packed
    /// snapshot serves a client process; its chunk-aligned region goes the deferred way (one
    /// fault per 2 MiB chunk read, not one per page), every byte verified by the client.
    func testLibraryServerServesFromASharedPackedSource() throws {
        let source = try PageSources.shared(packedFile)
        XCTAssertTrue(source is ChunkedSource)
        XCTAssertTrue(try PageSources.shared(packedFile) as AnyObject === source as AnyObject, "one instance per image")
        let listener = try HandoffListener(path: sock)
        var config = SnapshotServer.Configuration(source: source)
        config.once = true
        let done = expectation(description: "served")
        let outcome = Mutex<SnapshotServer.Outcome?>(nil)
        let server = SnapshotServer(listener: listener, configuration: config)
        Thread.detachNewThread {
            let o = server.run()
            outcome.withLock { $0 = o }
            done.fulfill()
        }
        let c = try client(["--size", "8M", "--offset", "4M"], name: "lib")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(c.output.contains("\"ok\":true"), c.output)
        wait(for: [done], timeout: 30)
        listener.close()
        let o = outcome.withLock { $0 }
        guard case .served(let s)? = o else { return XCTFail("outcome \(String(describing: o))") }
        XCTAssertEqual(s.bytes, 8 << 20)
        XCTAssertTrue(s.clean, "\(s)")
        XCTAssertLessThanOrEqual(s.faults, 64, "deferred chunks should take far fewer faults than 2048 pages: \(s)")
    }

    /// A hugetlb guest (2 MiB pages) from a packed snapshot behind a URL: whole chunks copied as
    /// huge pages on the deferred path, zero chunks as copies of zeros, a REMOVE afterwards.
    func testServeHugetlbGuestFromPackedURL() throws {
        let huge = HugePageReservation()
        defer { huge.restore() }
        guard huge.add(4) else {
            throw XCTSkip("cannot reserve 4 huge pages (not root or no hugetlb)")
        }
        let nginx = try Nginx()
        defer { nginx.stop() }
        try nginx.put("mem.packed", Data(contentsOf: URL(fileURLWithPath: packedFile)))
        let server = try startServer(nginx.url("mem.packed"))
        // 8 MiB from 4 MiB: chunks 2..5, one of them all zeros.
        let c = try client(["--size", "8M", "--offset", "4M", "--hugetlb", "--remove-pages", "1", "--kernel-pages", "1"], name: "huge")
        XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) \(c.log) server: \(server.log)")
        XCTAssertTrue(c.output.contains("\"ok\":true"), c.output)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertTrue(server.log.contains("(page 2097152)"), server.log)
        XCTAssertTrue(server.log.contains("fallbacks=0 "), server.log)
        XCTAssertTrue(server.log.contains("removed_bytes=2097152"), server.log)
    }

    func testServeFromLocalPackedSnapshot() throws {
        try serveThreeClients(from: packedFile)
    }

    func testServeFromMotoS3() throws {
        let s3 = try MotoS3()
        defer { s3.stop() }
        try s3.createBucket("snaps")
        try s3.put("snaps", "vm/mem", file: URL(fileURLWithPath: memFile))
        try s3.put("snaps", "vm/mem.packed", file: URL(fileURLWithPath: packedFile))
        s3.exportCredentials()   // the server inherits this process's environment
        try serveThreeClients(from: "s3://snaps/vm/mem", ["--endpoint", s3.endpoint])
        servers.forEach { $0.stop() }
        try serveThreeClients(from: "s3://snaps/vm/mem.packed", ["--endpoint", s3.endpoint])
    }

    /// The image server stops while a VM is being restored: the chunks that can no longer be
    /// fetched get the fallback (poison here: the client enabled UFFD_FEATURE_POISON and exits 4
    /// on SIGBUS), the failure is logged, no faulting thread hangs, and the server goes on serving
    /// another VM from the chunks it has cached.
    func testServeImageServerStoppedMidRestore() throws {
        let nginx = try Nginx()
        try nginx.put("mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        let server = try startServer(nginx.url("mem"), ["--retries", "0", "--request-timeout", "2"])
        // 500 us per page: a 2 MiB chunk takes 256 ms to read, so the last chunks are needed
        // well after the server is gone.
        let victim = try client(["--size", "16M", "--touch-delay-us", "500", "--poison-feature", "--expect-sigbus-from", "0"],
                                name: "victim")
        XCTAssertTrue(server.waitFor("serving VM"), server.log)
        usleep(100_000)
        nginx.stop()
        XCTAssertEqual(victim.wait(), 4, "the chunks that could not be fetched should get the poison fallback: \(victim.output) \(server.log)")
        XCTAssertTrue(server.waitFor("fault not served from the memory file"), server.log)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertNotNil(server.log.range(of: "fallbacks=[1-9]", options: .regularExpression), server.log)
        XCTAssertTrue(server.log.contains("127.0.0.1:\(nginx.port) refused"), "the failure should name the server: \(server.log)")
        // Another VM goes on: its first chunk was fetched before the server went away.
        let c = try client(["--size", "2M"], name: "cached")
        XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) server: \(server.log)")
        XCTAssertTrue(server.waitFor("VM gone", count: 2), server.log)
    }

    /// A worker killed (-9) while it serves a VM from a URL: the new worker reopens the URL
    /// (same ETag), adopts the uffd, wakes the ranges, and the VM finishes with every byte right.
    /// When the object was replaced meanwhile, a new worker refuses to serve it (the running VM
    /// would get a mix of two snapshots) and says so.
    func testServeFromURLAcrossWorkerKillReopensTheURL() throws {
        let nginx = try Nginx()
        defer { nginx.stop() }
        try nginx.put("mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        let wpid = dir.appendingPathComponent("w.pid").path
        func worker() throws -> Int32 {
            try XCTUnwrap(Int32(String(contentsOfFile: wpid, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        }
        let server = try startServer(nginx.url("mem"), ["--worker-pid-file", wpid])
        let c = try client(["--size", "16M", "--touch-delay-us", "300"], name: "restart")
        XCTAssertTrue(server.waitFor("serving VM"), server.log)
        usleep(300_000)
        kill(try worker(), SIGKILL)
        XCTAssertTrue(server.waitFor("resumed VM after restart"), server.log)
        XCTAssertEqual(c.wait(), 0, "client: \(c.output) server: \(server.log)")
        XCTAssertTrue(c.output.contains("\"ok\":true"), c.output)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertNil(server.log.range(of: "VM gone .*fallbacks=[1-9]", options: .regularExpression), server.log)

        // The object is replaced while a VM runs: the next worker must not serve it.
        let victim = try client(["--size", "16M", "--touch-delay-us", "300", "--timeout", "20"], name: "victim")
        XCTAssertTrue(server.waitFor("serving VM", count: 2), server.log)
        var other = try Data(contentsOf: URL(fileURLWithPath: memFile))
        other[0] ^= 0xFF
        other.append(0)   // another size: a new ETag even within the same mtime second
        try nginx.put("mem.new", other)
        XCTAssertEqual(rename(nginx.root.appendingPathComponent("mem.new").path, nginx.root.appendingPathComponent("mem").path), 0)
        let w = try worker()
        kill(w, SIGKILL)
        XCTAssertTrue(server.waitFor("changed since the VMs were restored", timeout: 30), server.log)
        kill(victim.process.processIdentifier, SIGKILL)
        victim.wait()
    }

    /// Every way the memory cannot be had at start-up is one line naming --memory-file and what
    /// to do, and exit 2 (like a missing file): 404, 403, a refused connection, an unknown host,
    /// a corrupt packed snapshot (local and behind a URL), a scheme that is not served.
    func testServeBadRemoteMemoryAtStartupExits2() throws {
        let nginx = try Nginx()
        defer { nginx.stop() }
        let packed = try Data(contentsOf: URL(fileURLWithPath: packedFile))
        let corrupt = dir.appendingPathComponent("corrupt.packed")
        try packed.prefix(100_000).write(to: corrupt)
        try nginx.put("corrupt.packed", packed.prefix(100_000))
        try nginx.put("denied/mem", Data(contentsOf: URL(fileURLWithPath: memFile)))
        let cases: [(String, String)] = [
            (nginx.url("missing"), "404"),
            (nginx.url("denied/mem"), "403"),
            ("http://127.0.0.1:\(freePort())/mem", "refused"),
            ("http://nonexistent.invalid/mem", "resolve"),
            (corrupt.path, "corrupt"),
            (nginx.url("corrupt.packed"), "corrupt"),
            ("ftp://example.com/mem", "http"),
        ]
        for (memory, why) in cases {
            let r = try runUffdctl(["serve", "--socket", sock, "--memory-file", memory], timeout: 40)
            XCTAssertEqual(r.code, 2, "\(memory): \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(memory): one line expected: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("--memory-file \(memory)"), r.stderr)
            XCTAssertTrue(r.stderr.contains(why), "\(memory): expected '\(why)' in: \(r.stderr)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: sock), "no socket should be left: \(memory)")
        }
    }
}
