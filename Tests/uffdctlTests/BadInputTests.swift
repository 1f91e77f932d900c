import Foundation
import XCTest

/// Bad input gets one clear line on stderr and the documented exit code, never a crash.
final class BadInputTests: XCTestCase {
    private func expect(_ args: [String], code: Int32, message: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try runUffdctl(args, timeout: 30)
        XCTAssertEqual(r.code, code, "\(args): stdout \(r.stdout) stderr \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(message), "\(args): stderr '\(r.stderr)' lacks '\(message)'", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("uffdctl: "), "\(args): '\(r.stderr)'", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertLessThanOrEqual(lines.count, code == 3 ? 2 : 1, "one line (plus the fix for exit 3): \(r.stderr)",
                                 file: file, line: line)
        XCTAssertTrue(r.stdout.isEmpty, "nothing on stdout: \(r.stdout)", file: file, line: line)
    }

    func testSizeZero() throws {
        try expect(["copy", "--size", "0"], code: 2, message: "--size must be greater than 0")
    }

    func testSizeNotPageAligned() throws {
        try expect(["copy", "--size", "5000"], code: 2, message: "not a multiple of the anon page size")
        try expect(["zeropage", "--size", "4097"], code: 2, message: "not a multiple")
    }

    func testSizeNotANumber() throws {
        try expect(["copy", "--size", "12Q"], code: 2, message: "unknown suffix")
        try expect(["copy", "--size", "lots"], code: 2, message: "is not a size")
        try expect(["copy", "--size", "99999999999999T"], code: 2, message: "too large")
    }

    func testSizeTheMachineCannotMap() throws {
        try expect(["copy", "--size", "100T"], code: 2, message: "more than this machine can map")
        try expect(["move", "--size", "1000G"], code: 2, message: "more than this machine can map")
    }

    func testUnknownMemoryType() throws {
        try expect(["copy", "--memory", "bogus"], code: 2, message: "'bogus' is invalid for '--memory")
    }

    func testUnknownOptionAndSubcommand() throws {
        try expect(["copy", "--frobnicate"], code: 2, message: "Unknown option '--frobnicate'")
        try expect(["frobnicate"], code: 2, message: "frobnicate")
    }

    func testMissingFile() throws {
        try expect(["copy", "--source", "file:/nonexistent/uffdctl-test"], code: 2, message: "cannot read /nonexistent/uffdctl-test: ENOENT")
    }

    func testFileThatIsADirectoryOrEmpty() throws {
        try expect(["copy", "--source", "file:/tmp"], code: 2, message: "is not a regular file")
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-empty-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: empty.path, contents: Data())
        defer { try? FileManager.default.removeItem(at: empty) }
        try expect(["copy", "--source", "file:\(empty.path)"], code: 2, message: "is empty")
    }

    func testUnreadableFile() throws {
        let f = URL(fileURLWithPath: "/tmp/uffdctl-noread-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: f.path, contents: Data([1, 2, 3]), attributes: [.posixPermissions: 0])
        defer { try? FileManager.default.removeItem(at: f) }
        if getuid() != 0 {
            try expect(["copy", "--source", "file:\(f.path)"], code: 2, message: "EACCES")
            return
        }
        // Root reads a mode-000 file: run the binary as nobody instead.
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"), getpwnam("nobody") != nil else {
            throw XCTSkip("root reads any file, and there is no setpriv/nobody to drop privileges")
        }
        let r = try runSetpriv(["--reuid=65534", "--regid=65534", "--clear-groups", try uffdctlURL().path,
                                "copy", "--source", "file:\(f.path)"])
        XCTAssertEqual(r.code, 2, r.stderr)
        XCTAssertEqual(r.stderr, "uffdctl: cannot read \(f.path): EACCES (Permission denied)\n")
    }

    func testBadSourceAndReadahead() throws {
        try expect(["copy", "--source", "nonsense"], code: 2, message: "use zero, pattern or file:PATH")
        try expect(["copy", "--readahead", "5K"], code: 2, message: "--readahead 5K is not a multiple of the page size")
        try expect(["copy", "--file-read", "direct"], code: 2, message: "--file-read 'direct': use mmap or pread")
    }

    func testTooManyThreads() throws {
        try expect(["copy", "--threads", "100000"], code: 2, message: "more than is sensible")
        try expect(["copy", "--threads", "0"], code: 2, message: "--threads must be at least 1")
        try expect(["zeropage", "--size", "8K", "--threads", "3"], code: 2, message: "more than the 2 pages")
    }

    func testBadPin() throws {
        try expect(["copy", "--pin", "4096"], code: 2, message: "--pin 4096: this machine has CPUs 0...")
        try expect(["copy", "--readers", "0"], code: 2, message: "--readers must be 1...64")
        try expect(["copy", "--timeout=-1"], code: 2, message: "--timeout must be a positive number")
    }

    func testBadPoisonPages() throws {
        try expect(["poison", "--size", "4M", "--pages", "5000"], code: 2, message: "outside the region")
        try expect(["poison", "--size", "4M", "--pages", "x"], code: 2, message: "is not a page index")
    }

    func testBadBenchOptions() throws {
        try expect(["bench", "--filter", "no-such-case"], code: 2, message: "matches no case")
        try expect(["bench", "--fault-cpu", "999"], code: 2, message: "--fault-cpu 999")
    }

    /// hugetlb: a session when huge pages are free, otherwise exit 3 with the sysctl fix (the
    /// CLI never changes it). Other users may reserve or release huge pages at any moment, so the
    /// outcome decides which path is checked; each path is checked fully.
    func testHugetlbSessionOrExit3WithFix() throws {
        let r = try runUffdctl(["copy", "--memory", "hugetlb", "--size", "4M", "--json"], timeout: 30)
        if r.code == 3 {
            XCTAssertTrue(r.stderr.contains("huge pages"), r.stderr)
            XCTAssertTrue(r.stderr.contains("fix: reserve huge pages as root: echo "), r.stderr)
            XCTAssertTrue(r.stderr.contains(" > /proc/sys/vm/nr_hugepages"), r.stderr)
            XCTAssertTrue(r.stdout.isEmpty)
        } else {
            XCTAssertEqual(r.code, 0, r.stderr)
            XCTAssertEqual(flag(r.json, "verified"), true)
            XCTAssertEqual(number(r.json, "faults"), 2)
            XCTAssertEqual(number(r.json, "page_size"), Double(2 << 20))
        }
        try expect(["copy", "--memory", "hugetlb", "--size", "3M"], code: 2, message: "not a multiple of the hugetlb page size")
    }

    /// An unprivileged user may not ask for EVENT_FORK (poison shows SIGBUS in a forked child):
    /// exit 3 with the fix, while a plain copy session works for that user (user-mode-only fd).
    func testUnprivilegedUser() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root to switch to the nobody user") }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { throw XCTSkip("no setpriv") }
        guard getpwnam("nobody") != nil else { throw XCTSkip("no nobody user") }
        let exe = try uffdctlURL().path
        guard access(exe, X_OK) == 0 else { throw XCTSkip("binary not executable") }
        let drop = ["--reuid=65534", "--regid=65534", "--clear-groups", exe]
        let poison = try runSetpriv(drop + ["poison", "--size", "1M"])
        guard !poison.stderr.contains("Permission denied") || poison.code == 3 else {
            throw XCTSkip("nobody cannot run the binary here: \(poison.stderr)")
        }
        XCTAssertEqual(poison.code, 3, poison.stderr)
        XCTAssertTrue(poison.stderr.contains("fix: EVENT_FORK needs CAP_SYS_PTRACE"), poison.stderr)
        let copy = try runSetpriv(drop + ["copy", "--size", "1M", "--json"])
        XCTAssertEqual(copy.code, 0, copy.stderr)
        XCTAssertEqual(flag(copy.json, "verified"), true)
    }

    /// Runs setpriv with `args`; the uffdctl binary among them runs from a copy in a fresh 0755
    /// folder under /tmp (removed afterwards): the checkout may sit in a folder the target user
    /// cannot enter (root's home, a mktemp -d).
    private func runSetpriv(_ args: [String]) throws -> CLIResult {
        let exe = try uffdctlURL().path
        let dir = "/tmp/uffdctl-as-user-\(UUID().uuidString)" // not TMPDIR: it may be private too
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false,
                                                attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let copy = dir + "/uffdctl"
        try FileManager.default.copyItem(atPath: exe, toPath: copy)
        XCTAssertEqual(chmod(copy, 0o755), 0)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = args.map { $0 == exe ? copy : $0 }
        p.currentDirectoryURL = URL(fileURLWithPath: "/")
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Small outputs: read after exit, with a watchdog on the wait.
        let deadline = Date().addingTimeInterval(30)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning { p.terminate(); XCTFail("setpriv run did not finish") }
        p.waitUntilExit()
        return CLIResult(code: p.terminationStatus,
                         stdout: String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self),
                         stderr: String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }
}
