import Foundation
import XCTest

/// The set-up both working-set serve test classes share: a temporary directory holding the
/// memory file and the socket, `uffdctl serve --once --json` servers stopped at tear-down, and
/// readers of the "VM gone" log line. Subclasses write `memFile` in their set-up.
class ServeWorkingSetTestCase: XCTestCase {
    var dir: URL!
    var memFile: String { dir.appendingPathComponent("mem").path }
    var sock: String { dir.appendingPathComponent("s.sock").path }
    var servers: [BackgroundUffdctl] = []
    /// The temporary directory's name prefix.
    var dirPrefix: String { "serve-ws" }

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(dirPrefix)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        servers.forEach { $0.stop() }
        try? FileManager.default.removeItem(at: dir)
    }

    func serve(_ extra: [String], memory: String? = nil) throws -> BackgroundUffdctl {
        let s = try BackgroundUffdctl(["serve", "--socket", sock, "--memory-file", memory ?? memFile, "--once", "--json"] + extra,
                                      dir: dir, name: "server\(servers.count)")
        servers.append(s)
        XCTAssertTrue(s.waitFor("listening"), "server did not start: \(s.log)")
        return s
    }

    /// The "VM gone" log line's fields.
    func gone(_ s: BackgroundUffdctl) -> [String: Any]? {
        let line = s.log.split(separator: "\n").first { $0.contains("\"VM gone\"") }
        return line.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    func int(_ o: [String: Any]?, _ k: String) -> Int? {
        if let s = o?[k] as? String { return Int(s) }
        return number(o, k).map { Int($0) }
    }
}

/// `uffdctl serve --record-working-set / --prefetch` with real hand-offs from
/// `uffdctl handoff-client` processes (every page verified by the client).
final class ServeWorkingSetTests: ServeWorkingSetTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        try memory(seed: 1).write(to: URL(fileURLWithPath: memFile))
    }

    /// 16 MiB of bytes that differ per page.
    func memory(seed: UInt64) -> Data {
        var bytes = [UInt8](repeating: 0, count: 16 << 20)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15 &* seed
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            withUnsafeBytes(of: x) { for j in 0..<8 { bytes[i + j] = $0[j] } }
        }
        return Data(bytes)
    }

    func testServeRecordsThenPrefetchesAVM() throws {
        let ws = dir.appendingPathComponent("vm.ws").path
        let s1 = try serve(["--record-working-set", ws])
        let c1 = try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", memFile, "--size", "4M", "--offset", "4M", "--regions", "2"],
                                       dir: dir, name: "c1")
        XCTAssertEqual(c1.wait(), 0, c1.output + c1.log)
        XCTAssertEqual(s1.wait(timeout: 30), 0, s1.log)
        XCTAssertTrue(s1.log.contains("working set recorded"), s1.log)
        let info = try runUffdctl(["working-set", "info", ws, "--json"])
        XCTAssertEqual(info.code, 0, info.stderr)
        XCTAssertEqual(number(info.json, "pages"), 1024, info.stdout)
        XCTAssertEqual(number(info.json, "image_size"), Double(16 << 20), info.stdout)
        XCTAssertEqual(number(info.json, "contiguous_runs"), 1, "the client reads its pages in order: \(info.stdout)")

        let s2 = try serve(["--prefetch", ws])
        let c2 = try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", memFile, "--size", "4M", "--offset", "4M", "--regions", "2"],
                                       dir: dir, name: "c2")
        XCTAssertEqual(c2.wait(), 0, c2.output + c2.log)
        XCTAssertEqual(s2.wait(timeout: 30), 0, s2.log)
        let g = gone(s2)
        XCTAssertEqual(int(g, "prefetch_planned_pages"), 1024, s2.log)
        XCTAssertEqual((int(g, "prefetched_pages") ?? 0) + (int(g, "prefetch_already_present_pages") ?? 0), 1024, s2.log)
        XCTAssertEqual(int(g, "prefetch_skipped_pages"), 0, s2.log)
        // One fault per page (one touching thread): every page present came from a fault or
        // the filler, and a page both had (the filler's copy won; the fault met EEXIST) is a
        // late fault whichever of the two noted the page first.
        XCTAssertEqual((int(g, "faults") ?? -1) + (int(g, "prefetched_pages") ?? -1) - (int(g, "prefetch_late_faults") ?? 0), 1024, s2.log)
    }

    func testServePrefetchOfAnotherMemoryFileExits2() throws {
        let ws = dir.appendingPathComponent("vm.ws").path
        let s1 = try serve(["--record-working-set", ws])
        let c1 = try BackgroundUffdctl(["handoff-client", "--socket", sock, "--memory-file", memFile, "--size", "2M"], dir: dir, name: "c1")
        XCTAssertEqual(c1.wait(), 0, c1.output + c1.log)
        XCTAssertEqual(s1.wait(timeout: 30), 0, s1.log)
        let other = dir.appendingPathComponent("other").path
        try memory(seed: 2).write(to: URL(fileURLWithPath: other))
        let r = try runUffdctl(["serve", "--socket", sock, "--memory-file", other, "--prefetch", ws])
        XCTAssertEqual(r.code, 2, r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("uffdctl: --prefetch") && r.stderr.contains("another version"), r.stderr)
        let both = try runUffdctl(["serve", "--socket", sock, "--memory-file", memFile, "--prefetch", ws, "--record-working-set", ws])
        XCTAssertEqual(both.code, 2, both.stderr)
        XCTAssertTrue(both.stderr.contains("cannot be combined"), both.stderr)
    }
}
