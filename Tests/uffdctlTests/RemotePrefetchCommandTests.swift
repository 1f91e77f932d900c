import Foundation
import TestServers
import UffdKit
import XCTest

/// `uffdctl copy --source http://… --prefetch FILE`: the recording is prefetched from a real
/// HTTP server (nginx on loopback) through the handler's deferred path, every byte verified.
final class RemotePrefetchCommandTests: XCTestCase {
    func testCopyFromURLWithPrefetchVerifiesEveryByte() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("remote-prefetch-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("image").path
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        var x: UInt64 = 0x0DDB_1A5E_5BAD_5EED
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            withUnsafeBytes(of: x) { for j in 0..<8 { bytes[i + j] = $0[j] } }
        }
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: Data(bytes)), "writing \(image)")
        let nginx = try Nginx()
        try nginx.put("image", Data(bytes))
        let ps = 4096
        var pages = Array(0..<(bytes.count / ps))
        var g = SystemRandomNumberGenerator()
        pages.shuffle(using: &g)
        let order = Array(pages.prefix(512))
        let ws = WorkingSet(identity: try WorkingSet.Identity(of: try FileSource(path: image)), pageSize: ps,
                            entries: order.enumerated().map { .init(offset: $0.element * ps, nanoseconds: UInt64($0.offset)) })
        try ws.write(to: dir.appendingPathComponent("w.ws").path)
        let r = try runUffdctl(["copy", "--source", nginx.url("image"), "--access", "random", "--prefetch",
                                dir.appendingPathComponent("w.ws").path, "--json", "--quiet"], timeout: 120)
        XCTAssertEqual(r.code, 0, r.stderr + r.stdout)
        XCTAssertEqual(flag(r.json, "verified"), true, r.stdout)
        let pf = r.json?["prefetch"] as? [String: Any]
        XCTAssertEqual(number(pf, "planned_pages"), 512, r.stdout)
        XCTAssertEqual((number(pf, "prefetched_pages") ?? 0) + (number(pf, "already_present_pages") ?? 0), 512, r.stdout)
        XCTAssertEqual(number(pf, "skipped_pages"), 0, r.stdout)
        // The deferred path's fields are reported: the filler's pages came through chunk
        // fetches, each chunk holding its recorded pages and (unrecorded) extra ones.
        let prefetched = number(pf, "prefetched_pages") ?? 0
        let chunks = number(pf, "deferred_chunks") ?? -1
        let extra = number(pf, "extra_pages") ?? -1
        XCTAssertNotNil(number(pf, "faults_joined"), r.stdout)
        XCTAssertNotNil(number(pf, "chunks_taken_by_faults"), r.stdout)
        XCTAssertEqual(number(pf, "dropped_fetches"), 0, r.stdout)
        if prefetched > 0 { XCTAssertGreaterThan(chunks, 0, r.stdout) }
        XCTAssertGreaterThanOrEqual(extra, 0, r.stdout)
        XCTAssertLessThanOrEqual(prefetched + extra, chunks * Double(2 << 20) / Double(ps), r.stdout)
        // Used, wasted and avoided count over the installed pages (the chunks' extra ones too)
        // that no fault took first: the workload reads every page, so none is wasted. (The
        // installed count comes from the ioctls, used from the per-page marks: a page a fault
        // raced for can be in the first and not the second.)
        let installed = number(pf, "installed_pages") ?? -1
        XCTAssertEqual(installed, prefetched + extra, r.stdout)
        let used = number(pf, "prefetched_and_used_pages") ?? -1
        XCTAssertLessThanOrEqual(used, installed, r.stdout)
        if installed > 0 { XCTAssertGreaterThan(used, 0, r.stdout) }
        XCTAssertEqual(number(pf, "wasted_bytes"), 0, r.stdout)
        XCTAssertLessThanOrEqual(number(pf, "faults_avoided") ?? .infinity, prefetched + extra, r.stdout)
        XCTAssertNotNil(number(pf, "time_to_last_page_seconds"), r.stdout)
    }
}
