import Foundation
import XCTest

/// `uffdctl copy --source file:` takes the window installer (InstallPolicy) by itself: every
/// byte verified by the session, the installer's counters and the huge-page coverage reported.
final class CopyInstallTests: XCTestCase {
    /// A file of `length` bytes of varied content (not a page multiple: a zero tail).
    private func makeFile(_ length: Int) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-install-\(UUID().uuidString)")
        var bytes = [UInt8](repeating: 0, count: length)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in 0..<length {
            x = x &* 6364136223846793005 &+ 1442695040888963407
            bytes[i] = UInt8(truncatingIfNeeded: x >> 33) | 1 // never zero: a missed byte shows
        }
        try Data(bytes).write(to: url)
        return url
    }

    /// THP can back a MADV_HUGEPAGE region (setting "always" or "madvise").
    private var thpAvailable: Bool {
        let s = (try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/enabled", encoding: .utf8)) ?? ""
        return s.contains("[always]") || s.contains("[madvise]")
    }

    private func install(_ j: [String: Any]?) -> [String: Any]? { j?["install"] as? [String: Any] }

    private let length = 5 * (1 << 20) + 3067 // 2 whole windows and a partial one
    private var region: Int { (length + 4095) / 4096 * 4096 }

    /// A file in tmpfs: the per-fault copy path copies from a mapping populated at start (one
    /// copy, no source faults); the installer (which reads with pread) leaves it lazy.
    func testTmpfsFileIsPopulatedForTheCopyPathOnly() throws {
        guard FileManager.default.fileExists(atPath: "/dev/shm") else { throw XCTSkip("no /dev/shm here") }
        let made = try makeFile(length)
        let url = URL(fileURLWithPath: "/dev/shm/uffdctl-populate-\(UUID().uuidString)")
        try FileManager.default.moveItem(at: made, to: url)
        defer { try? FileManager.default.removeItem(at: url) }
        let off = try runUffdctl(["copy", "--source", "file:\(url.path)", "--install", "off", "--readahead", "64K", "--json"])
        XCTAssertEqual(off.code, 0, off.stderr + off.stdout)
        XCTAssertEqual(flag(off.json, "verified"), true, off.stdout)
        XCTAssertEqual(off.json?["file_read"] as? String, "mmap", off.stdout)
        XCTAssertEqual(number(off.json, "file_populated_bytes"), Double(region), off.stdout)
        XCTAssertEqual(number(off.json, "fallbacks"), 0, off.stdout)
        let auto = try runUffdctl(["copy", "--source", "file:\(url.path)", "--json"])
        XCTAssertEqual(auto.code, 0, auto.stderr + auto.stdout)
        XCTAssertEqual(flag(auto.json, "verified"), true, auto.stdout)
        XCTAssertEqual(number(auto.json, "file_populated_bytes"), 0, auto.stdout)
    }

    func testFileSourceInstallsWindowsByDefault() throws {
        let url = try makeFile(length)
        defer { try? FileManager.default.removeItem(at: url) }
        let r = try runUffdctl(["copy", "--source", "file:\(url.path)", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr + r.stdout)
        let j = r.json
        XCTAssertEqual(flag(j, "verified"), true, r.stdout)
        XCTAssertEqual(number(j, "verified_bytes"), Double(region))
        XCTAssertEqual(number(j, "file_bytes"), Double(length))
        let i = install(j)
        XCTAssertEqual(number(i, "windows"), 3, r.stdout)
        XCTAssertEqual(number(i, "window"), Double(2 << 20))
        XCTAssertEqual(number(i, "failed"), 0)
        // The installer's bytes and the copy path's make the region, once.
        XCTAssertEqual(number(j, "resolved_bytes"), Double(region), r.stdout)
        XCTAssertEqual(number(i, "bytes"), Double(region), "a 2 MiB-aligned region: every window installed whole")
        let huge = number(j, "huge_page_bytes") ?? -1
        if thpAvailable {
            XCTAssertEqual(i?["mode"] as? String, "move", r.stdout)
            XCTAssertEqual((number(i, "moved") ?? 0) + (number(i, "copied") ?? 0), 3, r.stdout)
            // Each whole window moved is one huge page (the partial last one is copied).
            XCTAssertEqual(huge, (number(i, "moved") ?? 0) * Double(2 << 20), r.stdout)
            XCTAssertGreaterThanOrEqual(number(i, "moved") ?? 0, 1, r.stdout)
        } else {
            XCTAssertEqual(i?["mode"] as? String, "copy", r.stdout)
            XCTAssertEqual(huge, 0, r.stdout)
        }

        let text = try runUffdctl(["copy", "--source", "file:\(url.path)"])
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("install      \(thpAvailable ? "move" : "copy"), 2.0 MiB windows: "), text.stdout)
        XCTAssertTrue(text.stdout.contains("huge pages   "), text.stdout)
        XCTAssertTrue(text.stdout.contains("tail \(region - length) bytes zero"), text.stdout)
    }

    /// Every choice verifies every byte; off and an explicit --readahead keep the per-fault path.
    func testInstallChoicesAndReadahead() throws {
        let url = try makeFile(length)
        defer { try? FileManager.default.removeItem(at: url) }
        let src = ["copy", "--source", "file:\(url.path)", "--json"]

        let off = try runUffdctl(src + ["--install", "off"])
        XCTAssertEqual(off.code, 0, off.stderr)
        XCTAssertEqual(install(off.json)?["mode"] as? String, "off")
        XCTAssertEqual(number(off.json, "faults"), Double(region / 4096), "one page per fault without the installer")

        let ra = try runUffdctl(src + ["--readahead", "64K"])
        XCTAssertEqual(ra.code, 0, ra.stderr)
        XCTAssertEqual(install(ra.json)?["mode"] as? String, "off", "an explicit --readahead keeps its per-fault meaning")
        XCTAssertEqual(ra.json?["readahead"] as? String, "64.0 KiB")

        let copy = try runUffdctl(src + ["--install", "copy", "--threads", "2", "--access", "random", "--install-prefetch", "2"])
        XCTAssertEqual(copy.code, 0, copy.stderr + copy.stdout)
        XCTAssertEqual(flag(copy.json, "verified"), true)
        XCTAssertEqual(install(copy.json)?["mode"] as? String, "copy")
        XCTAssertEqual(number(install(copy.json), "moved"), 0)
        XCTAssertEqual(number(install(copy.json), "copied"), 3, copy.stdout)
        XCTAssertEqual(number(copy.json, "resolved_bytes"), Double(region))

        // An explicit install with --readahead: the installer, the copy path sized by --readahead.
        let both = try runUffdctl(src + ["--install", "move", "--readahead", "64K", "--install-prefetch", "0", "--write"])
        XCTAssertEqual(both.code, 0, both.stderr + both.stdout)
        XCTAssertEqual(flag(both.json, "verified"), true)
        XCTAssertEqual(number(install(both.json), "prefetched"), 0, "no prefetch thread")
        XCTAssertEqual(number(install(both.json), "bytes"), Double(region))
    }

    /// Other sources and shared memory with an explicit choice (COPY from the donor on shmem).
    func testExplicitInstallOnPatternAndShmem() throws {
        let p = try runUffdctl(["copy", "--size", "8M", "--install", "move", "--threads", "2", "--json"])
        XCTAssertEqual(p.code, 0, p.stderr + p.stdout)
        XCTAssertEqual(flag(p.json, "verified"), true)
        XCTAssertEqual(number(install(p.json), "windows"), 4)
        XCTAssertEqual(number(p.json, "resolved_bytes"), Double(8 << 20))
        if thpAvailable { XCTAssertEqual(number(p.json, "huge_page_bytes"), Double(8 << 20), p.stdout) }

        let url = try makeFile(length)
        defer { try? FileManager.default.removeItem(at: url) }
        let s = try runUffdctl(["copy", "--source", "file:\(url.path)", "--memory", "shmem", "--install", "copy", "--json"])
        XCTAssertEqual(s.code, 0, s.stderr + s.stdout)
        XCTAssertEqual(flag(s.json, "verified"), true)
        XCTAssertEqual(install(s.json)?["mode"] as? String, "copy")
        XCTAssertEqual(number(s.json, "resolved_bytes"), Double(region))

        // auto stays off on shmem (the fast path's MOVE needs anon memory).
        let a = try runUffdctl(["copy", "--source", "file:\(url.path)", "--memory", "shmem", "--json"])
        XCTAssertEqual(a.code, 0, a.stderr)
        XCTAssertEqual(install(a.json)?["mode"] as? String, "off")
        XCTAssertNotNil(number(a.json, "huge_page_bytes"))
    }

    /// THP unavailable to the process (PR_SET_THP_DISABLE, inherited across exec): the default
    /// install copies the windows from the donor, without error, and no huge page backs the region.
    func testTHPDisabledProcessCopiesWindows() throws {
        let python = "/usr/bin/python3"
        guard FileManager.default.isExecutableFile(atPath: python) else { throw XCTSkip("needs \(python) to exec uffdctl with PR_SET_THP_DISABLE") }
        let url = try makeFile(length)
        defer { try? FileManager.default.removeItem(at: url) }
        let exe = try uffdctlURL()
        let script = """
            import ctypes, os, sys
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(41, 1, 0, 0, 0) != 0: sys.exit("PR_SET_THP_DISABLE: errno %d" % ctypes.get_errno())
            os.execv(sys.argv[1], sys.argv[1:])
            """
        let watchdog = "/usr/bin/timeout" // a hang fails the test (exit 137), never the suite
        guard FileManager.default.isExecutableFile(atPath: watchdog) else { throw XCTSkip("needs \(watchdog) as the watchdog") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: watchdog)
        p.arguments = ["-s", "KILL", "60", python, "-c", script, exe.path, "copy", "--source", "file:\(url.path)", "--json"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        XCTAssertEqual(p.terminationStatus, 0, text)
        let j = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        XCTAssertEqual(flag(j, "verified"), true, text)
        let i = install(j)
        XCTAssertEqual(i?["mode"] as? String, "copy", text)
        XCTAssertEqual(number(i, "moved"), 0)
        XCTAssertEqual(number(i, "copied"), 3)
        XCTAssertNotNil(i?["note"] as? String, "the report says why the windows are copied")
        XCTAssertEqual(number(j, "huge_page_bytes"), 0, text)
        XCTAssertEqual(number(j, "resolved_bytes"), Double(region))
    }

    func testInstallBadInput() throws {
        let cases: [([String], String)] = [
            (["copy", "--install", "fast"], "--install"),
            (["copy", "--install", "move", "--memory", "shmem"], "--install move needs --memory anon"),
            (["copy", "--install", "copy", "--memory", "hugetlb"], "does not apply to hugetlb"),
            (["copy", "--install", "move", "--in-thread"], "cannot be combined with --in-thread"),
            (["copy", "--install", "copy", "--fail-pages", "1"], "cannot be combined with --fail-pages"),
            (["copy", "--install-prefetch", "9"], "--install-prefetch 9: use 0 to 4 threads"),
        ]
        for (args, message) in cases {
            let r = try runUffdctl(args)
            XCTAssertEqual(r.code, 2, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): '\(r.stderr)' lacks '\(message)'")
            XCTAssertTrue(r.stdout.isEmpty, "\(args): \(r.stdout)")
        }
    }
}
