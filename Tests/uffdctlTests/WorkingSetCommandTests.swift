import Foundation
import XCTest

/// `copy --record-working-set / --prefetch` and `working-set merge / info`, end to end.
final class WorkingSetCommandTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ws-cli-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// Record two runs from a file image, merge them, prefetch the merge: every byte verified,
    /// the prefetch installed pages, stats in the JSON.
    func testRecordMergeInfoAndPrefetchFromAFile() throws {
        let image = dir + "/image"
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        for i in stride(from: 0, to: bytes.count, by: 1) { bytes[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) }
        FileManager.default.createFile(atPath: image, contents: Data(bytes))
        for run in ["a", "b"] {
            let r = try runUffdctl(["copy", "--source", "file:" + image, "--access", "random", "--record-working-set", "\(dir)/\(run).ws", "--json", "--quiet"])
            XCTAssertEqual(r.code, 0, r.stderr)
            let ws = r.json?["working_set"] as? [String: Any]
            XCTAssertEqual(number(ws, "pages"), Double(2048), "\(r.stdout)")
        }
        let m = try runUffdctl(["working-set", "merge", "\(dir)/a.ws", "\(dir)/b.ws", "-o", "\(dir)/m.ws", "--json"])
        XCTAssertEqual(m.code, 0, m.stderr)
        XCTAssertEqual(number(m.json, "pages"), Double(2048), m.stdout)
        XCTAssertEqual(number(m.json, "runs"), 2, m.stdout)
        let info = try runUffdctl(["working-set", "info", "\(dir)/m.ws"])
        XCTAssertEqual(info.code, 0, info.stderr)
        XCTAssertTrue(info.stdout.contains("2048 of 4.0 KiB"), info.stdout)
        XCTAssertTrue(info.stdout.contains("2 runs merged"), info.stdout)

        let p = try runUffdctl(["copy", "--source", "file:" + image, "--access", "random", "--prefetch", "\(dir)/m.ws", "--json", "--quiet"])
        XCTAssertEqual(p.code, 0, p.stderr + p.stdout)
        let pf = p.json?["prefetch"] as? [String: Any]
        XCTAssertEqual(number(pf, "planned_pages"), 2048, p.stdout)
        let installed = (number(pf, "prefetched_pages") ?? -1) + (number(pf, "already_present_pages") ?? -1)
        XCTAssertEqual(installed, 2048, "each page once, by the filler or by a fault: \(p.stdout)")
        XCTAssertEqual(number(pf, "skipped_pages"), 0, p.stdout)
        XCTAssertEqual(pf?["ending"] as? String, "finished", p.stdout)
        XCTAssertEqual(number(pf, "wasted_bytes"), 0, p.stdout)
        XCTAssertEqual(flag(p.json, "verified"), true, p.stdout)
    }

    /// A recording from another image, or one whose pages lie past the region, is exit 2 at
    /// start with one line; so are unreadable and non-working-set files and bad merges.
    func testStaleMismatchedAndBadFilesAreErrorsAtStart() throws {
        let r = try runUffdctl(["copy", "--size", "4M", "--record-working-set", "\(dir)/p.ws", "--quiet"])
        XCTAssertEqual(r.code, 0, r.stderr)
        func refused(_ args: [String], _ message: String, line: UInt = #line) throws {
            let x = try runUffdctl(args)
            XCTAssertEqual(x.code, 2, "\(args): \(x.stderr)", line: line)
            XCTAssertTrue(x.stderr.hasPrefix("uffdctl: ") && x.stderr.contains(message), "\(args): \(x.stderr)", line: line)
            XCTAssertEqual(x.stderr.split(separator: "\n").count, 1, x.stderr, line: line)
            XCTAssertTrue(x.stdout.isEmpty, x.stdout, line: line)
        }
        try refused(["copy", "--size", "8M", "--prefetch", "\(dir)/p.ws"], "recorded from an image of 4194304 bytes")
        try refused(["copy", "--size", "4M", "--source", "zero", "--prefetch", "\(dir)/p.ws"], "another version of this image")
        try refused(["copy", "--size", "4M", "--prefetch", "\(dir)/missing.ws"], "cannot read working set")
        FileManager.default.createFile(atPath: "\(dir)/junk.ws", contents: Data("hello".utf8))
        try refused(["copy", "--size", "4M", "--prefetch", "\(dir)/junk.ws"], "not a working-set file")
        try refused(["copy", "--size", "4M", "--prefetch", "\(dir)/p.ws", "--record-working-set", "\(dir)/q.ws"], "cannot be combined")
        try refused(["working-set", "merge", "\(dir)/p.ws", "-o", "\(dir)/o.ws", "--min", "2"], "--min 2")
        try refused(["copy", "--size", "4M", "--in-thread", "--prefetch", "\(dir)/p.ws"], "--in-thread cannot be combined")
        let other = try runUffdctl(["copy", "--size", "4M", "--source", "zero", "--record-working-set", "\(dir)/z.ws", "--quiet"])
        XCTAssertEqual(other.code, 0, other.stderr)
        try refused(["working-set", "merge", "\(dir)/p.ws", "\(dir)/z.ws", "-o", "\(dir)/o.ws"], "another image")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/o.ws"))
    }

    /// Prefetch on hugetlb memory: 2 MiB pages installed by the filler, every byte verified.
    func testPrefetchOnHugetlb() throws {
        let path = "/proc/sys/vm/nr_hugepages"
        guard let old = (try? String(contentsOfFile: path, encoding: .utf8)).flatMap({ Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }) else {
            throw XCTSkip("cannot read \(path)")
        }
        do { try "\(old + 4)\n".write(toFile: path, atomically: false, encoding: .utf8) } catch {
            throw XCTSkip("cannot reserve huge pages (\(path) not writable: run as root)")
        }
        defer { try? "\(old)\n".write(toFile: path, atomically: false, encoding: .utf8) }
        let rec = try runUffdctl(["copy", "--memory", "hugetlb", "--size", "8M", "--access", "random", "--record-working-set", "\(dir)/h.ws", "--quiet"])
        if rec.code == 3 || rec.stderr.contains("cannot map hugetlb") { throw XCTSkip("hugetlb not available here: \(rec.stderr)") }
        XCTAssertEqual(rec.code, 0, rec.stderr)
        let p = try runUffdctl(["copy", "--memory", "hugetlb", "--size", "8M", "--access", "random", "--prefetch", "\(dir)/h.ws", "--json", "--quiet"])
        XCTAssertEqual(p.code, 0, p.stderr)
        let pf = p.json?["prefetch"] as? [String: Any]
        XCTAssertEqual(number(pf, "planned_pages"), 4, p.stdout)
        XCTAssertEqual((number(pf, "prefetched_pages") ?? 0) + (number(pf, "already_present_pages") ?? 0), 4, p.stdout)
        XCTAssertEqual(flag(p.json, "verified"), true, p.stdout)
    }
}
