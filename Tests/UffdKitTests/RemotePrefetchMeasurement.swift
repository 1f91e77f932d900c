import Foundation
import TestServers
import XCTest
@testable import UffdKit

/// Measurement (prints; asserts only correctness): a process reading a scattered working set
/// (1024 of the 2048 pages of an 8 MiB raw image, in a fixed random order) from a server that
/// adds 1 ms per request, 4 KiB fetches over 8 connections: on demand (synchronous CopyPolicy;
/// the reader waits for each fetch) against the same with the recorded working set prefetched
/// (Prefetcher over the same ChunkedSource: chunks requested 16 ahead, faults join them).
/// Every byte read is checked. Runs only when asked (`UFFDKIT_MEASURE=1`).
final class RemotePrefetchMeasurement: XCTestCase {
    func testRemoteOnDemandVersusPrefetched() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] != nil else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 to measure (takes ~10 s)")
        }
        let rig = try ScatteredRemoteRig("remoteprefetch")
        defer { rig.stop() }
        let image = rig.image, server = rig.server
        var o = RemoteOptions()
        o.rawChunkSize = basePageSize
        o.readaheadChunks = 0
        o.maxConnections = 8
        o.cacheBytes = 16 << 20
        let url = server.url("latency-1")
        let ps = basePageSize
        let order = rig.order
        let identity = try WorkingSet.Identity(of: try PageSources.open(url, options: o))
        let ws = WorkingSet(identity: identity, pageSize: ps, entries: order.map { .init(offset: $0 * ps, nanoseconds: 0) })
        var seconds: [String: [Double]] = ["on demand": [], "prefetched": []]
        for round in 0..<3 {
            for prefetch in (round % 2 == 0 ? [false, true] : [true, false]) {
                let source = try PageSources.open(url, options: o) as! ChunkedSource
                let r = try MappedRegion(.anonymous(), length: image.count)
                let range = ServedRange(region: r)
                let tracker = try WorkingSetTracker(range: range, recording: false)
                var ho = FaultHandler.Options()
                ho.fallback = .zeroFill
                let s = try Session(r, options: ho) { _ in WorkingSetPolicy(CopyPolicy(range: range, source: source), tracker: tracker) }
                let base = r.address
                let start = Date()
                var p: Prefetcher? = nil
                if prefetch {
                    p = try Prefetcher(uffd: s.uffd, range: range, source: source, workingSet: ws, tracker: tracker)
                    try p!.start(alongside: s.handler)
                }
                let bad = Box(0)
                s.run(120) {
                    var wrong = 0
                    for pg in order where UnsafePointer<UInt8>(bitPattern: base + UInt(pg * ps) + 17)!.pointee != image[pg * ps + 17] { wrong += 1 }
                    bad.update { $0 = wrong }
                }
                let t = Date().timeIntervalSince(start)
                let st = p?.stats()
                p?.stop()
                let hs = s.finish()
                XCTAssertEqual(bad.value, 0)
                XCTAssertEqual(hs.fallbacks + hs.failures, 0)
                seconds[prefetch ? "prefetched" : "on demand", default: []].append(t)
                print(String(format: "round %d %@: %.3f s, faults %d%@", round, prefetch ? "prefetched" : "on demand", t, Int(hs.faults),
                             st.map { ", filler installed \($0.prefetchedPages), found present \($0.alreadyPresentPages)" } ?? ""))
            }
        }
        func med(_ a: [Double]) -> Double { a.sorted()[a.count / 2] }
        let a = seconds["on demand"]!, b = seconds["prefetched"]!
        print(String(format: "remote 1 ms: on demand median %.3f s (min %.3f), prefetched median %.3f s (min %.3f): %.2fx (min %.2fx)",
                     med(a), a.min()!, med(b), b.min()!, med(a) / med(b), a.min()! / b.min()!))
    }
}

/// The remote measurements' shared rig: an 8 MiB raw image (2048 pages) in a temporary
/// directory, served by a MisbehavingServer, and the scattered working set read from it (1024
/// pages in a fixed xorshift-shuffled order, the same every run so rounds compare).
struct ScatteredRemoteRig {
    let dir: URL
    let image: Data
    let server: MisbehavingServer
    let order: [Int]

    init(_ name: String) throws {
        dir = try makeTempDir(name)
        image = makeImage(chunks: 4, zeroEvery: 100, tail: 0)
        let file = dir.appendingPathComponent("img")
        do {
            try image.write(to: file)
            server = try MisbehavingServer(serving: file)
        } catch {
            try? FileManager.default.removeItem(at: dir)
            throw error
        }
        let ps = basePageSize
        var x: UInt64 = 0x2545_F491_4F6C_DD1D
        var all = Array(0..<(image.count / ps))
        for i in stride(from: all.count - 1, to: 0, by: -1) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            all.swapAt(i, Int(x % UInt64(i + 1)))
        }
        order = Array(all.prefix(1024))
    }

    /// Stops the server, then removes the directory (the order the two defers had).
    func stop() {
        server.stop()
        try? FileManager.default.removeItem(at: dir)
    }
}
