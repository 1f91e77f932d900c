import Foundation
import UffdKit
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
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: Data(bytes)))
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
        // Every stat of the issue and of the deferred path is in the JSON, and they agree.
        for k in ["prefetched_pages", "prefetched_bytes", "prefetched_and_used_pages", "faults_avoided", "wasted_bytes",
                  "time_to_last_page_seconds", "deferred_chunks", "faults_joined", "chunks_taken_by_faults",
                  "dropped_fetches", "extra_pages", "seconds"] {
            XCTAssertNotNil(pf?[k], "\(k) missing: \(p.stdout)")
        }
        let prefetched = number(pf, "prefetched_pages") ?? -1
        XCTAssertEqual(number(pf, "prefetched_bytes"), prefetched * 4096, p.stdout)
        // The workload reads every page: every prefetched page was used.
        XCTAssertEqual(number(pf, "prefetched_and_used_pages"), prefetched, p.stdout)
        XCTAssertLessThanOrEqual(number(pf, "faults_avoided") ?? .infinity, prefetched, p.stdout)
        let last = number(pf, "time_to_last_page_seconds") ?? -1
        XCTAssertGreaterThanOrEqual(last, 0, p.stdout)
        XCTAssertLessThanOrEqual(last, number(pf, "seconds") ?? -1, p.stdout)
        // A local file is not fetched through the deferred table.
        XCTAssertEqual(number(pf, "deferred_chunks"), 0, p.stdout)
        XCTAssertEqual(number(pf, "extra_pages"), 0, p.stdout)
        let text = try runUffdctl(["copy", "--source", "file:" + image, "--access", "random", "--prefetch", "\(dir)/m.ws", "--quiet"])
        XCTAssertEqual(text.code, 0, text.stderr + text.stdout)
        XCTAssertTrue(text.stdout.contains("prefetch ") && text.stdout.contains(" used "), text.stdout)
    }

    /// The filler of `copy --prefetch` reads a raw file through its mapping by default (one
    /// copy: UFFDIO_COPY from the page cache) or with pread into scratch (--file-read pread);
    /// both install every page once, every byte verified, the page-cache pages mapped at start.
    func testPrefetchReadsTheFileThroughTheMappingOrPread() throws {
        for (where_, root) in [("disk", dir), ("tmpfs", "/dev/shm")] {
            guard FileManager.default.fileExists(atPath: root) else { continue }
            let image = root + "/servepath-ws-\(getpid()).img"
            defer { unlink(image) }
            var bytes = [UInt8](repeating: 0, count: 4 << 20)
            for i in stride(from: 0, to: bytes.count, by: 1) { bytes[i] = UInt8(truncatingIfNeeded: (i &* 40_503) >> 9) }
            XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: Data(bytes.dropLast(1000))))
            let ws = "\(dir)/\(where_).ws"
            let r = try runUffdctl(["copy", "--source", "file:" + image, "--access", "random", "--install", "off",
                                    "--record-working-set", ws, "--json", "--quiet"])
            XCTAssertEqual(r.code, 0, r.stderr)
            for read in ["mmap", "pread"] {
                let p = try runUffdctl(["copy", "--source", "file:" + image, "--access", "random", "--prefetch", ws,
                                        "--file-read", read, "--json", "--quiet"])
                XCTAssertEqual(p.code, 0, p.stderr + p.stdout)
                XCTAssertEqual(p.json?["file_read"] as? String, read, p.stdout)
                let populated = number(p.json, "file_populated_bytes")
                // The image was just written: all of it is in the page cache, on disk too.
                XCTAssertEqual(populated, read == "mmap" ? Double(4 << 20) : 0, "\(where_) \(read): \(p.stdout)")
                let pf = p.json?["prefetch"] as? [String: Any]
                let installed = (number(pf, "prefetched_pages") ?? -1) + (number(pf, "already_present_pages") ?? -1)
                XCTAssertEqual(installed, 1024, "\(where_) \(read): each page once: \(p.stdout)")
                XCTAssertEqual(number(pf, "skipped_pages"), 0, p.stdout)
                XCTAssertEqual(flag(p.json, "verified"), true, p.stdout)
            }
        }
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
        XCTAssertTrue(FileManager.default.createFile(atPath: "\(dir)/junk.ws", contents: Data("hello".utf8)))
        try refused(["copy", "--size", "4M", "--prefetch", "\(dir)/junk.ws"], "not a working-set file")
        try refused(["copy", "--size", "4M", "--prefetch", "\(dir)/p.ws", "--record-working-set", "\(dir)/q.ws"], "cannot be combined")
        try refused(["working-set", "merge", "\(dir)/p.ws", "-o", "\(dir)/o.ws", "--min", "2"], "--min 2")
        try refused(["copy", "--size", "4M", "--in-thread", "--prefetch", "\(dir)/p.ws"], "--in-thread cannot be combined")
        let other = try runUffdctl(["copy", "--size", "4M", "--source", "zero", "--record-working-set", "\(dir)/z.ws", "--quiet"])
        XCTAssertEqual(other.code, 0, other.stderr)
        try refused(["working-set", "merge", "\(dir)/p.ws", "\(dir)/z.ws", "-o", "\(dir)/o.ws"], "another image")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/o.ws"))
    }

    /// `snapshot pack --working-set`: the recorded chunks' frames come first, in recorded order
    /// and contiguous (the index says where), the file unpacks byte for byte, and a copy session
    /// from the packed snapshot prefetches the working set with every byte verified.
    func testPackWorkingSetFirstAndPrefetchFromThePackedSnapshot() throws {
        let image = dir + "/image"
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        var x: UInt64 = 0x1234_5678_9ABC_DEF1
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            withUnsafeBytes(of: x >> 40) { for j in 0..<8 { bytes[i + j] = $0[j] } } // compressible, never all zero
        }
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: Data(bytes)))
        let chunk = 1 << 20, ps = 4096
        let order = [5, 2, 7]
        var entries: [WorkingSet.Entry] = []
        for c in order { for p in [3, 0, 200] { entries.append(.init(offset: c * chunk + p * ps, nanoseconds: UInt64(entries.count))) } }
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: try FileSource(path: image)), pageSize: ps, entries: entries)
        try ws.write(to: dir + "/w.ws")
        let r = try runUffdctl(["snapshot", "pack", image, dir + "/p.pak", "--chunk-size", "1M", "--working-set", dir + "/w.ws", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertEqual(number(r.json, "working_set_chunks"), 3, r.stdout)
        // The index: where each chunk's frame is.
        let packed = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/p.pak")))
        func u64(_ at: Int) -> Int { (0..<8).reduce(0) { $0 | Int(packed[at + $1]) << (8 * $1) } }
        let count = u64(24), indexAt = u64(32)
        XCTAssertEqual(count, 8)
        let frameAt = (0..<count).map { u64(indexAt + 16 * $0) }
        XCTAssertEqual(frameAt[5], 4096, "the first recorded chunk's frame comes first")
        XCTAssertLessThan(frameAt[5], frameAt[2])
        XCTAssertLessThan(frameAt[2], frameAt[7])
        let end = Int(number(r.json, "working_set_frames_end") ?? 0)
        for c in 0..<count where !order.contains(c) { XCTAssertGreaterThanOrEqual(frameAt[c], end, "chunk \(c) after the working set") }
        for c in order { XCTAssertLessThan(frameAt[c], end) }
        let u = try runUffdctl(["snapshot", "unpack", dir + "/p.pak", dir + "/raw"])
        XCTAssertEqual(u.code, 0, u.stderr)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/raw")), Data(bytes))
        // The packed snapshot is the same image: the recording prefetches from it.
        let p = try runUffdctl(["copy", "--source", "file:" + dir + "/p.pak", "--access", "random", "--prefetch", dir + "/w.ws", "--json", "--quiet"])
        XCTAssertEqual(p.code, 0, p.stderr + p.stdout)
        XCTAssertEqual(flag(p.json, "verified"), true, p.stdout)
        let pf = p.json?["prefetch"] as? [String: Any]
        XCTAssertEqual(number(pf, "planned_pages"), 9, p.stdout)
        XCTAssertEqual((number(pf, "prefetched_pages") ?? 0) + (number(pf, "already_present_pages") ?? 0), 9, p.stdout)
        // A recording of another image is refused before packing.
        var other = ws
        other.identity.digest ^= 1
        try other.write(to: dir + "/o.ws")
        let bad = try runUffdctl(["snapshot", "pack", image, dir + "/q.pak", "--working-set", dir + "/o.ws"])
        XCTAssertEqual(bad.code, 2, bad.stderr)
        XCTAssertTrue(bad.stderr.contains("another version"), bad.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/q.pak"))
    }

    /// Prefetch on hugetlb memory: 2 MiB pages installed by the filler, every byte verified.
    func testPrefetchOnHugetlb() throws {
        let huge = HugePageReservation()
        defer { huge.restore() }
        guard huge.add(4) else { throw XCTSkip("cannot reserve 4 huge pages (vm.nr_hugepages: not root, or taken by another process)") }
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
