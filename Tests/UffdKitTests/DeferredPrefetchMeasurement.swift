import Foundation
import TestServers
import XCTest
@testable import UffdKit

/// Measurement (prints; asserts only correctness): a process reading a scattered working set
/// (1024 of the 2048 pages of an 8 MiB raw image, in a fixed random order) from a server that
/// adds 1 ms per request, 8 connections. Interleaved in one run, 3 rounds:
/// - on demand 4 KiB: synchronous CopyPolicy, no prefetch (the baseline);
/// - sync filler 4 KiB: the same plus the Prefetcher's synchronous filler (chunks requested 16
///   ahead into the source's cache);
/// - deferred 4 KiB: DeferredCopyPolicy plus the Prefetcher through the handler's deferred
///   table (16 chunk fetches in flight; faults on a chunk in flight join it);
/// - deferred 64 KiB: the same with 64 KiB chunks (the recorded pages' chunks, 16 pages each).
/// Time: from the handler's start to the end of the process's verified pass over its pages.
/// Runs only when asked (`UFFDKIT_MEASURE=1`).
final class DeferredPrefetchMeasurement: XCTestCase {
    func testRemoteOnDemandVersusDeferredPrefetch() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] != nil else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 to measure (takes ~20 s)")
        }
        let rig = try ScatteredRemoteRig("deferredprefetchbench")
        defer { rig.stop() }
        let image = rig.image, server = rig.server
        let url = server.url("latency-1")
        let ps = basePageSize
        let order = rig.order
        func options(_ chunk: Int) -> RemoteOptions {
            var o = RemoteOptions()
            o.rawChunkSize = chunk
            o.readaheadChunks = 0
            o.maxConnections = 8
            o.cacheBytes = 16 << 20
            return o
        }
        let identity = try WorkingSet.Identity(of: try PageSources.open(url, options: options(ps)))
        let ws = WorkingSet(identity: identity, pageSize: ps, entries: order.map { .init(offset: $0 * ps, nanoseconds: 0) })
        let variants = ["on demand 4K", "sync filler 4K", "claims 4K", "deferred 4K", "deferred 64K"]
        var seconds: [String: [Double]] = [:]
        for round in 0..<3 {
            let rotated = Array(variants[round...] + variants[..<round])
            for v in rotated {
                let source = try PageSources.open(url, options: options(v.hasSuffix("64K") ? 64 << 10 : ps)) as! ChunkedSource
                let deferred = v.hasPrefix("deferred")
                let r = try MappedRegion(.anonymous(), length: image.count)
                let range = ServedRange(region: r)
                var ho = FaultHandler.Options()
                ho.fallback = .zeroFill
                let start = Date()
                let s = try Session(r, options: ho) { _ in
                    deferred ? DeferredCopyPolicy(destination: r.address, source: source) as any FaultPolicy
                             : CopyPolicy(range: range, source: source)
                }
                let base = r.address
                var p: Prefetcher? = nil
                if v != "on demand 4K" {
                    var po = Prefetcher.Options()
                    if v == "sync filler 4K" { po.deferredFetches = 0 }
                    p = try Prefetcher(uffd: s.uffd, range: range, source: source, workingSet: ws, options: po)
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
                XCTAssertEqual(bad.value, 0, v)
                XCTAssertEqual(hs.fallbacks + hs.failures, 0, v)
                image.withUnsafeBytes { img in
                    for pg in order { XCTAssertEqual(memcmp(r.pointer + pg * ps, img.baseAddress! + pg * ps, ps), 0, "\(v) page \(pg)") }
                }
                seconds[v, default: []].append(t)
                print(String(format: "round %d %@: %.3f s, faults %d, deferred joined %d%@", round, v, t, Int(hs.faults), Int(hs.deferredJoined),
                             st.map { ", filler installed \($0.prefetchedPages) recorded + \($0.extraPages) other pages (\($0.deferredChunks) deferred chunks, \($0.faultsJoined) faults joined), found present \($0.alreadyPresentPages)" } ?? ""))
            }
        }
        func med(_ a: [Double]) -> Double { a.sorted()[a.count / 2] }
        let base = seconds["on demand 4K"]!
        for v in variants {
            let a = seconds[v]!
            print(String(format: "remote 1 ms, %@: median %.3f s (min %.3f): %.2fx on demand (min/min %.2fx)",
                         v, med(a), a.min()!, med(base) / med(a), base.min()! / a.min()!))
        }
    }
}
