import Foundation
import TestServers
import XCTest
@testable import UffdKit

/// Measurement (prints, asserts only correctness): random 4 KiB faults from 8 threads on a raw
/// image behind a server that adds 1 ms per request, with 4 KiB fetches over 8 connections —
/// synchronous (CopyPolicy: the reader waits for each fetch) against deferred
/// (DeferredCopyPolicy: the reader goes on), and the ideal of connections ÷ RTT, where RTT is
/// one request measured alone on the same server in the same run. Numbers go to BENCHMARKS.md.
final class RemoteRandomFaultMeasurement: XCTestCase {
    func testRandomFaultsSyncVersusDeferred() throws {
        let dir = try makeTempDir("randfault")
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = makeImage(chunks: 4, zeroEvery: 100, tail: 0)     // 8 MiB, 2048 pages
        let file = dir.appendingPathComponent("img")
        try image.write(to: file)
        let server = try MisbehavingServer(serving: file)
        var o = RemoteOptions()
        o.rawChunkSize = basePageSize
        o.readaheadChunks = 0
        o.maxConnections = 8
        o.cacheBytes = 16 << 20
        o.retries = 2
        let url = server.url("latency-1")
        // RTT: 50 sequential one-page fetches through one source.
        let probe = try PageSources.open(url, options: o) as! ChunkedSource
        let buf = UnsafeMutableRawPointer.allocate(byteCount: basePageSize, alignment: 4096)
        defer { buf.deallocate() }
        let t0 = Date()
        for i in 0..<50 { _ = try probe.bytesTyped(at: i * 7 * basePageSize, count: basePageSize, scratch: buf) }
        let rtt = Date().timeIntervalSince(t0) / 50
        let pages = 1024
        var results: [String: Double] = [:]
        for deferred in [false, true] {
            let source = try PageSources.open(url, options: o) as! ChunkedSource
            let r = try MappedRegion(.anonymous(), length: image.count)
            var ho = FaultHandler.Options()
            ho.fallback = .zeroFill
            ho.readers = 1
            let s = try Session(r, options: ho) { _ in
                deferred ? DeferredCopyPolicy(destination: r.address, source: source) as any FaultPolicy
                         : CopyPolicy(region: r, source: source)
            }
            let base = r.address
            let order = Array((0..<(image.count / basePageSize)).shuffled().prefix(pages))
            let start = Date()
            s.run(120) {
                // Eight real threads (concurrentPerform would run only as many as there are CPUs).
                let threads = (0..<8).map { t in
                    Thread {
                        var sum = 0
                        for p in order.enumerated().filter({ $0.offset % 8 == t }).map(\.element) {
                            sum &+= Int(UnsafePointer<UInt8>(bitPattern: base + UInt(p * basePageSize))!.pointee)
                        }
                        if sum == -1 { print(sum) }
                    }
                }
                threads.forEach { $0.start() }
                while threads.contains(where: { !$0.isFinished }) { usleep(200) }
            }
            let seconds = Date().timeIntervalSince(start)
            let st = s.finish()
            XCTAssertEqual(st.fallbacks, 0)
            image.withUnsafeBytes { b in
                for p in order { XCTAssertEqual(memcmp(r.pointer + p * basePageSize, b.baseAddress! + p * basePageSize, basePageSize), 0) }
            }
            results[deferred ? "deferred" : "sync"] = Double(pages) / seconds
        }
        // The fetch ceiling without userfaultfd: the same 1024 random pages requested through
        // a fresh source's prefetch (completion callbacks on the fetcher thread), 8 connections.
        final class Count: @unchecked Sendable {
            let sem = DispatchSemaphore(value: 0)
        }
        let count = Count()
        let ctx = Unmanaged.passRetained(count)
        defer { ctx.release() }
        let cb: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?) -> Void = { c, _, _ in
            Unmanaged<Count>.fromOpaque(c!).takeUnretainedValue().sem.signal()
        }
        let ceilingSource = try PageSources.open(url, options: o) as! ChunkedSource
        let order = Array((0..<(image.count / basePageSize)).shuffled().prefix(pages))
        let c0 = Date()
        for p in order { XCTAssertEqual(ceilingSource.prefetch(chunk: p, context: ctx.toOpaque(), done: cb), 0) }
        for _ in order { XCTAssertEqual(count.sem.wait(timeout: .now() + 60), .success) }
        results["fetch ceiling"] = Double(pages) / Date().timeIntervalSince(c0)
        let ideal = 8 / rtt
        print(String(format: "remote random 4 KiB faults, 8 threads, 8 connections, RTT %.2f ms: ideal %.0f/s, sync %.0f/s (%.2fx ideal), deferred %.0f/s (%.2fx ideal), fetch ceiling without uffd %.0f/s (%.2fx ideal)",
                     rtt * 1000, ideal, results["sync"]!, results["sync"]! / ideal, results["deferred"]!, results["deferred"]! / ideal,
                     results["fetch ceiling"]!, results["fetch ceiling"]! / ideal))
    }
}
