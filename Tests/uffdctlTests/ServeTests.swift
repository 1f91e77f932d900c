import CUffdTestSupport
import Foundation
import UffdKit
import Synchronization
import XCTest

/// A running `uffdctl serve` (or `uffdctl handoff-client`) process with its stderr in a file.
final class BackgroundUffdctl {
    let process = Process()
    let dir: URL
    let errURL: URL
    let outURL: URL

    init(_ arguments: [String], dir: URL, name: String) throws {
        self.dir = dir
        errURL = dir.appendingPathComponent("\(name).err")
        outURL = dir.appendingPathComponent("\(name).out")
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        process.executableURL = try uffdctlURL()
        process.arguments = arguments
        process.standardError = try FileHandle(forWritingTo: errURL)
        process.standardOutput = try FileHandle(forWritingTo: outURL)
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var log: String { (try? String(contentsOf: errURL, encoding: .utf8)) ?? "" }
    var output: String { (try? String(contentsOf: outURL, encoding: .utf8)) ?? "" }

    /// Waits (watchdog: `timeout` s, then SIGKILL and a test failure) for the exit status.
    @discardableResult
    func wait(timeout: TimeInterval = 60, file: StaticString = #filePath, line: UInt = #line) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            XCTFail("\(process.arguments?.first ?? "") did not finish within \(timeout) s; log:\n\(log)", file: file, line: line)
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Waits until the log contains `text` `count` times (false after `timeout` s).
    func waitFor(_ text: String, count: Int = 1, timeout: TimeInterval = 20) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if log.components(separatedBy: text).count - 1 >= count { return true }
            usleep(20_000)
        }
        return false
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGTERM) }
        _ = wait(timeout: 20)
    }
}

/// Tests of `uffdctl serve` and the UffdKit hand-off without Firecracker: real uffds handed over
/// a real socket by `uffdctl handoff-client` processes (and by this test process for the bad
/// hand-offs), every page verified against the memory file.
final class ServeTests: XCTestCase {
    var dir: URL!
    var memFile: String { dir.appendingPathComponent("mem").path }
    var sock: String { dir.appendingPathComponent("s.sock").path }
    var servers: [BackgroundUffdctl] = []

    override func setUpWithError() throws {
        // Tests named *_tmpfs keep the memory file in /dev/shm (the populated-mapping path).
        let tmpfs = name.contains("_tmpfs")
        if tmpfs && !FileManager.default.fileExists(atPath: "/dev/shm") { throw XCTSkip("no /dev/shm here") }
        let parent = tmpfs ? URL(fileURLWithPath: "/dev/shm") : FileManager.default.temporaryDirectory
        dir = parent.appendingPathComponent("serve-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        // 16 MiB of bytes that differ per page (a wrong offset cannot pass).
        var bytes = [UInt8](repeating: 0, count: 16 << 20)
        var x: UInt64 = 0x9E3779B97F4A7C15
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x = x &* 6364136223846793005 &+ 1442695040888963407
            withUnsafeBytes(of: x) { for j in 0..<8 { bytes[i + j] = $0[j] } }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: memFile))
    }

    override func tearDown() {
        servers.forEach { $0.stop() }
        try? FileManager.default.removeItem(at: dir)
    }

    func startServer(_ extra: [String] = []) throws -> BackgroundUffdctl {
        let s = try BackgroundUffdctl(["serve", "--socket", sock, "--memory-file", memFile] + extra, dir: dir, name: "server\(servers.count)")
        servers.append(s)
        XCTAssertTrue(s.waitFor("listening"), "server did not start: \(s.log)")
        return s
    }

    func client(_ extra: [String] = [], name: String) throws -> BackgroundUffdctl {
        try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", memFile, "--timeout", "60"] + extra, dir: dir, name: name)
    }

    // MARK: Happy paths

    func testServeSeveralClientsAtOnceWithKernelFaultsAndRemove() throws {
        let server = try startServer()
        let clients = try [
            client(["--size", "8M", "--kernel-pages", "16", "--remove-pages", "8"], name: "a"),
            client(["--size", "4M", "--offset", "8M", "--regions", "2"], name: "b"),
            client(["--size", "4M", "--offset", "12M", "--touch-delay-us", "50"], name: "c"),
        ]
        for c in clients {
            XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) \(c.log)")
            XCTAssertTrue(c.output.contains("\"ok\":true"), c.output)
        }
        XCTAssertTrue(server.waitFor("VM gone", count: 3), server.log)
        XCTAssertTrue(server.log.contains("faults=2048"), server.log)
        XCTAssertTrue(server.log.contains("removes=1"), "the REMOVE event was not seen: \(server.log)")
        XCTAssertTrue(server.log.contains("peer_pid=\(clients[0].process.processIdentifier)"), server.log)
        XCTAssertTrue(server.log.contains("p99_us="), server.log)
    }

    func testServeHugetlbGuest() throws {
        let need = 4
        defer { restoreHugePages() }
        guard setHugePages(extra: need) else {
            throw XCTSkip("cannot reserve \(need) huge pages (not root or no hugetlb)")
        }
        let server = try startServer(["--readahead", "4M"])
        let c = try client(["--size", "8M", "--hugetlb", "--remove-pages", "1", "--kernel-pages", "1"], name: "huge")
        XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) \(c.log) server: \(server.log)")
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertTrue(server.log.contains("page 2097152"), server.log)
        XCTAssertTrue(server.log.contains("removed_bytes=2097152"), server.log)
    }

    // MARK: Huge-page coverage (issue 14)

    /// The JSON log lines of `server` whose msg is `msg`.
    func events(_ server: BackgroundUffdctl, _ msg: String) -> [[String: Any]] {
        server.log.split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
        }.filter { $0["msg"] as? String == msg }
    }

    /// A client that lingers after touching its memory: serve's `VM stats` lines measure it
    /// fully served (`want` huge bytes of `size`), and `VM gone` reports the last measurement.
    func assertCoverage(client extra: [String], size: Int, pages: Int, want: Int, name: String,
                        file: StaticString = #filePath, line: UInt = #line) throws {
        let server = try startServer(["--json", "--stats-interval", "0.05"])
        let c = try client(extra + ["--linger-ms", "1500"], name: name)
        XCTAssertEqual(c.wait(), 0, "client failed: \(c.output) \(c.log) server: \(server.log)", file: file, line: line)
        XCTAssertTrue(server.waitFor("\"VM gone\""), server.log, file: file, line: line)
        let pid = Double(c.process.processIdentifier)
        let served = events(server, "VM stats").filter { number($0, "peer_pid") == pid && number($0, "faults") == Double(pages) }
        XCTAssertFalse(served.isEmpty, "no VM stats line once every page was served: \(server.log)", file: file, line: line)
        for s in served {
            XCTAssertEqual(number(s, "huge_page_bytes"), Double(want), "\(s)", file: file, line: line)
            XCTAssertEqual(number(s, "huge_page_of_bytes"), Double(size), "\(s)", file: file, line: line)
            XCTAssertLessThan(number(s, "huge_page_measured_s_ago") ?? 99, 1, "measured for this line: \(s)", file: file, line: line)
        }
        let gone = try XCTUnwrap(events(server, "VM gone").first { number($0, "peer_pid") == pid }, server.log, file: file, line: line)
        XCTAssertEqual(number(gone, "huge_page_bytes"), Double(want), "the last value measured: \(gone)", file: file, line: line)
        XCTAssertEqual(number(gone, "huge_page_of_bytes"), Double(size), "\(gone)", file: file, line: line)
        let ago = try XCTUnwrap(number(gone, "huge_page_measured_s_ago"), "gone cannot measure: it says how old the value is: \(gone)",
                                file: file, line: line)
        XCTAssertGreaterThan(ago, 0, "\(gone)", file: file, line: line)
        XCTAssertLessThan(ago, 30, "\(gone)", file: file, line: line)
    }

    /// A 4 KiB anonymous guest served by COPY: COPY installs 4 KiB pages, so 0 bytes are huge.
    func testServeReportsZeroHugePageCoverageForA4KiBGuest() throws {
        try assertCoverage(client: ["--size", "4M"], size: 4 << 20, pages: 1024, want: 0, name: "cov4k")
    }

    /// A 2 MiB hugetlb guest: every byte of it is in huge pages once served.
    func testServeReportsFullHugePageCoverageForAHugetlbGuest() throws {
        let need = 4
        defer { restoreHugePages() }
        guard setHugePages(extra: need) else {
            throw XCTSkip("cannot reserve \(need) huge pages (not root or no hugetlb)")
        }
        try assertCoverage(client: ["--size", "8M", "--hugetlb"], size: 8 << 20, pages: 4, want: 8 << 20, name: "cov2m")
    }

    /// Without a stats line before the VM went away, there is nothing to report: "-", not 0.
    func testServeGoneBeforeAnyMeasurementSaysUnknown() throws {
        let server = try startServer(["--stats-interval", "0"])
        let c = try client(["--size", "2M"], name: "nocov")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertTrue(server.log.contains("huge_page_bytes=- huge_page_measured_s_ago=- huge_page_of_bytes=-"), server.log)
        XCTAssertFalse(server.log.contains("VM stats"), server.log)
    }

    func testServeOnceExitsWithTheOutcome() throws {
        let server = try startServer(["--once", "--json"])
        let c = try client(["--size", "2M"], name: "once")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertEqual(server.wait(timeout: 30), 0, server.log)
        let gone = server.log.split(separator: "\n").first { $0.contains("\"VM gone\"") }
        let obj = gone.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        XCTAssertEqual(number(obj, "faults"), 512, server.log)
    }

    func testLibraryServerServesAClientProcess() throws {
        let fd = open(memFile, O_RDONLY)
        defer { close(fd) }
        let listener = try HandoffListener(path: sock)
        var config = SnapshotServer.Configuration(memoryFile: fd, memoryFileLength: 16 << 20)
        config.once = true
        let events = Mutex<[String]>([])
        let server = SnapshotServer(listener: listener, configuration: config) { e in
            if case .gone(_, let s) = e { events.withLock { $0.append("gone \(s.faults) \(s.clean)") } }
        }
        let done = expectation(description: "served")
        let outcome = Mutex<SnapshotServer.Outcome?>(nil)
        Thread.detachNewThread {
            let o = server.run()
            outcome.withLock { $0 = o }
            done.fulfill()
        }
        let c = try client(["--size", "4M", "--offset", "4M"], name: "lib")
        XCTAssertEqual(c.wait(), 0, c.output)
        wait(for: [done], timeout: 30)
        listener.close()
        XCTAssertEqual(events.withLock { $0 }, ["gone 1024 true"])
        let o = outcome.withLock { $0 }
        guard case .served(let s)? = o else { return XCTFail("outcome \(String(describing: o))") }
        XCTAssertEqual(s.bytes, 4 << 20)
    }

    func testServeRemoveEventsRacingFaultsNoEAGAINStorm() throws {
        let server = try startServer()
        let c = try client(["--size", "16M", "--remove-concurrently", "400", "--kernel-pages", "8"], name: "race")
        XCTAssertEqual(c.wait(), 0, "client: \(c.output)")
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        let line = try XCTUnwrap(server.log.split(separator: "\n").first { $0.contains("VM gone") })
        func field(_ k: String) -> Int? {
            line.split(separator: " ").first { $0.hasPrefix(k + "=") }.flatMap { Int($0.dropFirst(k.count + 1)) }
        }
        let removes = try XCTUnwrap(field("removes")), retries = try XCTUnwrap(field("retries"))
        XCTAssertGreaterThan(removes, 0, String(line))
        // Each EAGAIN is answered by reading the pending events: a few retries per event, not a storm.
        XCTAssertLessThan(retries, 4 * removes + 16, String(line))
        XCTAssertEqual(field("fallbacks"), 0, String(line))
    }

    /// This test process gives its own memory to `uffdctl serve` through the library, with a
    /// legacy body (only `page_size_kib`, as Firecracker v1.7–v1.11 send it).
    func testSwiftClientHandsItsOwnMemoryToServe() throws {
        let server = try startServer()
        let length = 2 << 20
        let region = try MappedRegion(.anonymous(), length: length)
        let uffd = try Userfaultfd(features: [.eventRemove], options: [.nonBlocking, .kernelFaults])
        try uffd.register(region.address, length: length, modes: .missing)
        let body = #"[{"base_host_virt_addr":\#(region.address),"size":\#(length),"offset":4194304,"page_size_kib":4096}]"#
        let s = try Handoff.connect(to: sock)
        defer { close(s) }
        try Handoff.send(fd: uffd.fd, body: Array(body.utf8), over: s)
        // Watchdog: if serving fails, unregistering wakes the touching thread (zeros: the test fails).
        let done = Atomic<Bool>(false)
        let addr = region.address
        Thread.detachNewThread {
            let deadline = Date().addingTimeInterval(20)
            while !done.load(ordering: .acquiring) && Date() < deadline { usleep(10_000) }
            if !done.load(ordering: .acquiring) { try? uffd.unregister(addr, length: length) }
        }
        let file = try Data(contentsOf: URL(fileURLWithPath: memFile))
        var wrong = 0
        for page in 0..<(length / 4096) {
            let mem = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: region.address + UInt(page * 4096)), count: 4096)
            let want = file[(4 << 20) + page * 4096 ..< (4 << 20) + (page + 1) * 4096]
            if !mem.elementsEqual(want) { wrong += 1 }
        }
        done.store(true, ordering: .releasing)
        XCTAssertEqual(wrong, 0, server.log)
        XCTAssertTrue(server.log.contains("peer_pid=\(getpid())"), server.log)
    }

    // MARK: Restart

    func testServeSurvivesWorkerKillAndSighup() throws {
        let wpid = dir.appendingPathComponent("w.pid").path
        let spid = dir.appendingPathComponent("s.pid").path
        let server = try startServer(["--worker-pid-file", wpid, "--pid-file", spid])
        let c = try client(["--size", "8M", "--touch-delay-us", "1000"], name: "restart")
        XCTAssertTrue(server.waitFor("serving VM"), server.log)
        usleep(300_000)
        let w1 = try XCTUnwrap(Int32(String(contentsOfFile: wpid, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(w1, SIGKILL)
        XCTAssertTrue(server.waitFor("resumed VM after restart"), server.log)
        usleep(300_000)
        // A new snapshot at the same path does not change what running VMs are served: the
        // restarted processes serve the file the first one opened.
        let orig = memFile + ".orig"
        XCTAssertEqual(link(memFile, orig), 0)
        try Data(repeating: 0xEE, count: 16 << 20).write(to: URL(fileURLWithPath: memFile + ".new"))
        XCTAssertEqual(rename(memFile + ".new", memFile), 0)
        let s = try XCTUnwrap(Int32(String(contentsOfFile: spid, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(s, SIGHUP)
        XCTAssertTrue(server.waitFor("supervisor re-executed"), server.log)
        XCTAssertTrue(server.waitFor("resumed VM after restart", count: 2), server.log)
        XCTAssertEqual(c.wait(), 0, "client: \(c.output) server: \(server.log)")
        XCTAssertTrue(c.output.contains("\"ok\":true"))
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        // Both restarts happened while the client was still faulting: the last worker served it to the end.
        let log = server.log
        let reexec = try XCTUnwrap(log.range(of: "supervisor re-executed")), gone = try XCTUnwrap(log.range(of: "VM gone"))
        XCTAssertLessThan(reexec.lowerBound, gone.lowerBound, log)
        XCTAssertNil(log.range(of: "VM gone .*faults=0 ", options: .regularExpression), log)
        // New hand-offs work after the restarts.
        let d = try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", orig, "--size", "1M"], dir: dir, name: "after")
        XCTAssertEqual(d.wait(), 0, d.output)
    }

    // MARK: Bad input

    func testServeRefusesBadHandoffsAndKeepsServing() throws {
        let wpid = dir.appendingPathComponent("w.pid").path
        let server = try startServer(["--receive-timeout", "300", "--worker-pid-file", wpid])
        let worker = try XCTUnwrap(Int32(String(contentsOfFile: wpid, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        // The fds a refused hand-off could leave behind: connections, received userfaultfds, and
        // the non-uffd fd sent ("not a uffd" sends our fd 0). Not all fds: the worker's signal
        // sources open signalfds lazily (libdispatch), which once raced the baseline (9 vs 11).
        let sentTarget = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/0")) ?? "?"
        func openFDs() -> Int {
            let fdDir = "/proc/\(worker)/fd"
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: fdDir) else { return -1 }
            return names.filter { name in
                guard let t = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(fdDir)/\(name)") else { return false }
                return t.hasPrefix("socket:") || t == "anon_inode:[userfaultfd]" || t == sentTarget
            }.count
        }
        let fdsBefore = openFDs()
        let uffd = try Userfaultfd(features: [.eventRemove], options: [.nonBlocking, .kernelFaults])
        let good = #"[{"base_host_virt_addr":1048576,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
        let cases: [(String, [Int32], [UInt8], String)] = [
            ("malformed", [uffd.fd], Array("{not json".utf8), "not valid JSON"),
            ("truncated", [uffd.fd], Array(good.utf8.dropLast(5)), "not valid JSON"),
            ("no fd", [], Array(good.utf8), "carried 0 fds"),
            ("two fds", [uffd.fd, uffd.fd], Array(good.utf8), "carried 2 fds"),
            ("too large", [uffd.fd], [UInt8](repeating: 0x20, count: 70_000), "body over"),
            ("unaligned", [uffd.fd], Array(good.replacingOccurrences(of: "1048576", with: "1048577").utf8), "not aligned"),
            ("size 0", [uffd.fd], Array(good.replacingOccurrences(of: "\"size\":4096", with: "\"size\":0").utf8), "size 0"),
            ("past file", [uffd.fd], Array(good.replacingOccurrences(of: "\"offset\":0", with: "\"offset\":16777216").utf8), "past the memory file"),
            ("page size", [uffd.fd], Array(good.replacingOccurrences(of: "4096,\"page_size_kib\":4096", with: "8192").utf8), "not 4096 or 2097152"),
            ("overlap", [uffd.fd], Array(#"[{"base_host_virt_addr":1048576,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":1052672,"size":4096,"offset":0,"page_size":4096}]"#.utf8), "overlap"),
            ("not a uffd", [0], Array(good.utf8), "not a userfaultfd"),
            ("silent", [], [], "sent nothing"),
        ]
        for (name, fds, body, reason) in cases {
            let s = try Handoff.connect(to: sock)
            defer { close(s) }
            if !body.isEmpty || !fds.isEmpty {
                // A body over the socket buffer is sent by a thread (the server stops reading).
                if body.count > 60_000 {
                    Thread.detachNewThread { try? Handoff.send(fds: fds, body: body, over: s) }
                } else {
                    try Handoff.send(fds: fds, body: body, over: s)
                }
            }
            XCTAssertTrue(server.waitFor(reason), "\(name): no '\(reason)' in the log: \(server.log)")
            XCTAssertTrue(closedByPeer(s), "\(name): the connection was not closed")
        }
        XCTAssertEqual(server.log.components(separatedBy: "refused hand-off").count - 1, cases.count, server.log)
        usleep(200_000)
        XCTAssertEqual(openFDs(), fdsBefore, "the worker leaked fds of refused hand-offs")
        let c = try client(["--size", "1M"], name: "good")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.process.isRunning)
    }

    /// The server checks SO_PEERCRED before reading anything, so a refused peer's close races
    /// its sendmsg: EPIPE (`.closed`) when the close came first, else the send succeeds and the
    /// connection then ends unread. Both are the refusal; an allowed peer is served meanwhile.
    func testServeRefusesPeerNotInAllowedUIDs() throws {
        chmod(dir.path, 0o755)
        let server = try startServer(["--allow-uid", "0", "--socket-mode", "0666"])
        let s = rel_connect_as(4242, 4242, sock, 10_000)
        if s == -EACCES { throw XCTSkip("uid 4242 cannot reach \(sock) (a parent folder is not searchable by others)") }
        XCTAssertGreaterThanOrEqual(s, 0, "connect as uid 4242: \(s)")
        guard s >= 0 else { return }
        defer { close(s) }
        let uffd = try Userfaultfd(features: [], options: [.nonBlocking, .kernelFaults])
        do {
            try Handoff.send(fd: uffd.fd, body: GuestRegion.encode([GuestRegion(baseHostVirtAddr: 1 << 20, size: 4096, offset: 0, pageSize: 4096)]), over: s)
            XCTAssertTrue(closedByPeer(s), "the refused connection must end")
        } catch {
            XCTAssertEqual(error.kind, .closed, "\(error)")
            XCTAssertTrue(error.message.contains("refused"), "\(error)")
        }
        XCTAssertTrue(server.waitFor("is not an allowed uid"), server.log)
        XCTAssertTrue(server.log.contains("uid=4242"), server.log)
        let c = try client(["--size", "1M"], name: "allowed")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
    }

    func testServeMemoryFileMissingUnreadableOrEmptyExits2() throws {
        let empty = dir.appendingPathComponent("empty").path
        _ = FileManager.default.createFile(atPath: empty, contents: nil)
        for f in [dir.appendingPathComponent("missing").path, empty, dir.path] {
            let r = try runUffdctl(["serve", "--socket", sock, "--memory-file", f], timeout: 20)
            XCTAssertEqual(r.code, 2, "\(f): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("--memory-file"), r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
    }

    func testServeHelpHasAFirecrackerExampleAndBadOptionsExit2() throws {
        let help = try runUffdctl(["serve", "--help"], timeout: 20)
        XCTAssertEqual(help.code, 0)
        for text in ["snapshot/create", "snapshot/load", "\"backend_type\":\"Uffd\"", "worker_pid", "SIGHUP"] {
            XCTAssertTrue(help.stdout.contains(text), "--help lacks \(text)")
        }
        for bad in [["--socket-mode", "999"], ["--pin", "99"], ["--readahead", "3000"], ["--fallback", "maybe"], ["--readers", "0"],
                    ["--stats-interval", "100000"], ["--stats-interval", "nan"]] {
            let r = try runUffdctl(["serve", "--socket", sock, "--memory-file", memFile] + bad, timeout: 20)
            XCTAssertEqual(r.code, 2, "\(bad): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(bad[0]), "\(bad): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: sock), "a bad option must not leave a socket behind")
    }

    func testServeRefusesASocketAnotherServerListensOn() throws {
        let first = try startServer()
        let r = try runUffdctl(["serve", "--socket", sock, "--memory-file", memFile], timeout: 20)
        XCTAssertEqual(r.code, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("another server is listening"), r.stderr)
        let c = try client(["--size", "1M"], name: "still")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(first.waitFor("VM gone"), first.log)
    }

    func testServeClientKilledMidRestoreOthersGoOn() throws {
        let server = try startServer()
        let slow = try client(["--size", "8M", "--touch-delay-us", "2000"], name: "killed")
        XCTAssertTrue(server.waitFor("serving VM"), server.log)
        usleep(200_000)
        kill(slow.process.processIdentifier, SIGKILL)
        slow.wait()
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        let c = try client(["--size", "2M"], name: "next")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.waitFor("VM gone", count: 2), server.log)
    }

    func testServeMemoryFileReadErrorGivesFallbackAndOthersGoOn() throws {
        try readErrorGivesFallback(source: "mmap")
    }

    func testServeMemoryFileReadErrorGivesFallbackAndOthersGoOn_pread() throws {
        try readErrorGivesFallback(source: "pread")
    }

    /// A memory file in tmpfs is mapped and populated at start-up (the COPY fast path); the
    /// shrinking file still gives the fallback for the pages past its new end.
    func testServeMemoryFileReadErrorGivesFallbackAndOthersGoOn_tmpfs() throws {
        try readErrorGivesFallback(source: "mmap", populated: 16 << 20)
    }

    /// Several VMs served at once from a populated tmpfs mapping, every page verified by the
    /// clients; `--source pread` populates nothing.
    func testServeFromPopulatedTmpfsMapping_tmpfs() throws {
        let server = try startServer()
        XCTAssertTrue(server.log.contains("memory_populate=background"), server.log)
        XCTAssertTrue(server.waitFor("memory file populated bytes=\(16 << 20)"), server.log)
        let clients = try [
            client(["--size", "8M", "--kernel-pages", "16"], name: "a"),
            client(["--size", "4M", "--offset", "8M", "--regions", "2"], name: "b"),
        ]
        for c in clients { XCTAssertEqual(c.wait(), 0, c.output) }
        XCTAssertTrue(server.waitFor("VM gone", count: 2), server.log)
        XCTAssertNil(server.log.range(of: "fallbacks=[1-9]", options: .regularExpression), server.log)
        server.stop()
        let pread = try startServer(["--source", "pread"])
        XCTAssertFalse(pread.log.contains("memory_populate"), pread.log)
        XCTAssertFalse(pread.log.contains("memory file populated"), pread.log)
    }

    /// The populate of a big tmpfs memory file (1 GiB resident, ~0.1-0.4 s to map here) runs
    /// beside serving: "listening" comes first and says so, a VM restored meanwhile gets every
    /// byte right, and the populate's one line (text, then --json) comes from its thread when it
    /// ends, with the whole file's bytes.
    func testServeListensBeforeTheMemoryFilePopulateEnds_tmpfs() throws {
        let size = 1 << 30
        let fd = open(memFile, O_RDWR | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        // The first 16 MiB stay the pattern the clients check; the rest written, so resident
        // (fallocated tmpfs pages are not in mincore's count and would not be populated).
        let buf = [UInt8](repeating: 0xA5, count: 4 << 20)
        var off = 16 << 20
        while off < size {
            let n = buf.withUnsafeBytes { pwrite(fd, $0.baseAddress, Swift.min($0.count, size - off), off_t(off)) }
            guard n > 0 else { close(fd); throw XCTSkip("cannot write a 1 GiB file in /dev/shm: errno \(errno)") }
            off += n
        }
        close(fd)
        let wpid = dir.appendingPathComponent("w.pid").path
        let server = try startServer(["--worker-pid-file", wpid])
        let c = try client(["--size", "8M", "--regions", "2"], name: "early")
        XCTAssertTrue(server.waitFor("memory file populated", timeout: 60), server.log)
        let log = server.log
        guard let listening = log.range(of: "listening"), let populated = log.range(of: "memory file populated") else {
            return XCTFail(log)
        }
        XCTAssertLessThan(listening.lowerBound, populated.lowerBound, log)
        XCTAssertTrue(log.contains("memory_populate=background"), log)
        XCTAssertNotNil(log.range(of: "memory file populated bytes=\(size) seconds=[0-9]+\\.[0-9]{3}", options: .regularExpression), log)
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.waitFor("VM gone"), server.log)
        XCTAssertNil(server.log.range(of: "fallbacks=[1-9]", options: .regularExpression), server.log)
        // A worker killed while a VM faults: the new one resumes it and serves before its own
        // populate ends.
        let slow = try client(["--size", "8M", "--touch-delay-us", "1000"], name: "restart")
        XCTAssertTrue(server.waitFor("serving VM", count: 2), server.log)
        usleep(200_000)
        let w1 = try XCTUnwrap(Int32(String(contentsOfFile: wpid, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(w1, SIGKILL)
        XCTAssertTrue(server.waitFor("memory file populated", count: 2, timeout: 60), server.log)
        let after = server.log
        guard let restarted = after.range(of: "worker serving after restart"),
              let second = after.range(of: "memory file populated", range: populated.upperBound..<after.endIndex) else {
            return XCTFail(after)
        }
        XCTAssertLessThan(restarted.lowerBound, second.lowerBound, after)
        XCTAssertTrue(after[restarted.lowerBound...].prefix(while: { $0 != "\n" }).contains("memory_populate=background"), after)
        XCTAssertEqual(slow.wait(), 0, "client: \(slow.output) server: \(server.log)")
        XCTAssertTrue(server.waitFor("VM gone", count: 2), server.log)
        server.stop()
        let json = try startServer(["--json"])
        XCTAssertTrue(json.waitFor("\"msg\":\"memory file populated\"", timeout: 60), json.log)
        let line = json.log.split(separator: "\n").first { $0.contains("\"msg\":\"memory file populated\"") } ?? ""
        let obj = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        XCTAssertEqual(obj?["bytes"] as? Int, size, String(line))
        XCTAssertNotNil(obj?["seconds"] as? Double, String(line))
        XCTAssertEqual(obj?["level"] as? String, "info", String(line))
    }

    func readErrorGivesFallback(source: String, populated: Int? = nil) throws {
        let server = try startServer(["--source", source])
        if let populated { XCTAssertTrue(server.waitFor("memory file populated bytes=\(populated)"), server.log) }
        // A hand-off past the file as it is now is refused (the file shrank since start-up).
        XCTAssertEqual(truncate(memFile, 4 << 20), 0)
        let refused = try client(["--size", "2M", "--offset", "6M", "--timeout", "5"], name: "refused")
        XCTAssertTrue(server.waitFor("past the memory file"), server.log)
        kill(refused.process.processIdentifier, SIGKILL)
        refused.wait()
        XCTAssertEqual(truncate(memFile, 16 << 20), 0)
        // The file shrinks while a VM is served: its pages past the end cannot be read; they get
        // the poison fallback (the client enabled UFFD_FEATURE_POISON): SIGBUS, exit 4.
        let victim = try client(["--size", "8M", "--offset", "8M", "--touch-delay-us", "300", "--poison-feature",
                                 "--expect-sigbus-from", "0"], name: "victim")
        XCTAssertTrue(server.waitFor("serving VM", count: 1), server.log)
        usleep(100_000)
        XCTAssertEqual(truncate(memFile, 10 << 20), 0)
        XCTAssertEqual(victim.wait(), 4, "the page past the file should get the poison fallback (SIGBUS): \(victim.output)")
        XCTAssertTrue(server.waitFor("fault not served from the memory file"), server.log)
        XCTAssertTrue(server.waitFor("VM gone", count: 1), server.log)
        XCTAssertNotNil(server.log.range(of: "fallbacks=[1-9]", options: .regularExpression), server.log)
        // Others go on.
        let c = try client(["--size", "2M"], name: "fine")
        XCTAssertEqual(c.wait(), 0, c.output)
        XCTAssertTrue(server.waitFor("VM gone", count: 2), server.log)
        XCTAssertNotNil(server.log.range(of: "fallbacks=0 faults=512", options: .regularExpression), server.log)
    }

    // MARK: Protocol decoding

    func testGuestRegionDecodesFirecrackerBodies() throws {
        let v112 = #"[{"base_host_virt_addr":140309461729280,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
        let r = try GuestRegion.decode(Array(v112.utf8))
        XCTAssertEqual(r, [GuestRegion(baseHostVirtAddr: 140309461729280, size: 134217728, offset: 0, pageSize: 4096)])
        let legacy = #"[{"base_host_virt_addr":4096,"size":2097152,"offset":2097152,"page_size_kib":2097152}]"#
        XCTAssertEqual(try GuestRegion.decode(Array(legacy.utf8)).first?.pageSize, 2 << 20)
        XCTAssertThrowsError(try GuestRegion.decode(Array(#"[{"base_host_virt_addr":0,"size":1,"offset":0,"page_size":4096,"page_size_kib":4}]"#.utf8)))
        XCTAssertThrowsError(try GuestRegion.decode(Array(#"[{"base_host_virt_addr":-1,"size":1,"offset":0,"page_size":4096}]"#.utf8)))
        let back = try GuestRegion.decode(GuestRegion.encode(r))
        XCTAssertEqual(back, r)
        XCTAssertTrue(String(decoding: GuestRegion.encode(r), as: UTF8.self).contains("\"page_size_kib\":4096"))
    }

    // MARK: Helpers

    func closedByPeer(_ s: Int32) -> Bool {
        var p = pollfd(fd: s, events: Int16(POLLIN), revents: 0)
        let deadline = Date().addingTimeInterval(5)
        var buf = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            if poll(&p, 1, 100) > 0 {
                let n = recv(s, &buf, buf.count, Int32(MSG_DONTWAIT))
                if n == 0 || (n < 0 && errno == ECONNRESET) { return true }
            }
        }
        return false
    }

    private let hugePages = HugePageReservation()
    func setHugePages(extra: Int) -> Bool { hugePages.add(extra) }
    func restoreHugePages() { hugePages.restore() }
}
