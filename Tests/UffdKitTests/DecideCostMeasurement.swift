import CUffd
import Foundation
import Synchronization
import XCTest
@testable import UffdKit

/// Cost of the Swift side of the fault path (the decide trampoline and the per-batch complete),
/// measured on synthetic batches, no kernel involved. Not a timed test: it asserts nothing about
/// speed and only runs when asked (`UFFDKIT_MEASURE=1`, release build with -enable-testing).
final class DecideCostMeasurement: XCTestCase {
    func measure(_ name: String, _ policy: any FaultPolicy, base: UInt) -> (Double, Double) {
        let sink = HandlerSink(options: .init())
        let r = Reader(index: 0, files: nil, ready: nil, deferred: nil, features: [], userModeOnly: true, policy: policy, batch: 64,
                       slot: (policy.scratchBytes + 4095) / 4096 * 4096, cpu: nil, options: .init(), sink: sink)!
        let n = 64
        var msgs = [uffd_msg](repeating: uffd_msg(), count: n)
        for i in 0..<n {
            msgs[i].event = UInt8(UFFD_EVENT_PAGEFAULT)
            msgs[i].arg.pagefault.address = UInt64(base) + UInt64(i * 4096 + 123)
        }
        var res = [cuffd_resolution](repeating: cuffd_resolution(), count: n)
        let iters = 20_000
        let ctx = Unmanaged.passUnretained(r).toOpaque()
        var check: UInt64 = 0
        let t0 = cuffd_now_ns()
        for _ in 0..<iters {
            msgs.withUnsafeBufferPointer { m in
                res.withUnsafeMutableBufferPointer { rr in decideTrampoline(ctx, m.baseAddress, rr.baseAddress, n) }
            }
            check &+= res[n - 1].dst
        }
        let t1 = cuffd_now_ns()
        for i in 0..<n { res[i].outcome = UInt32(CUFFD_OUTCOME_RESOLVED.rawValue); res[i].end_ns = 5000 }
        for _ in 0..<iters {
            msgs.withUnsafeBufferPointer { m in
                res.withUnsafeBufferPointer { rr in completeTrampoline(ctx, m.baseAddress, rr.baseAddress, n) }
            }
        }
        let t2 = cuffd_now_ns()
        XCTAssertNotEqual(check, 0)
        XCTAssertEqual(res[0].op, res[1].op)
        let decide = Double(t1 - t0) / Double(iters * n), complete = Double(t2 - t1) / Double(iters * n)
        print(String(format: "decide %@: %.1f ns/fault, complete: %.1f ns/fault (batch %d)", name, decide, complete, n))
        return (decide, complete)
    }

    func testMeasureDecidePath() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] != nil else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 (and build with -c release -Xswiftc -enable-testing) to measure")
        }
        let base: UInt = 0x7000_0000_0000
        let len = 1 << 30
        let mem = MemorySource(length: 1 << 20) { _ in }
        _ = measure("ZeroFillPolicy", ZeroFillPolicy(start: base, length: len), base: base)
        _ = measure("CopyPolicy(MemorySource)", CopyPolicy(start: base, length: 1 << 20, source: mem), base: base)
        _ = measure("Readahead(adaptive, Copy)", ReadaheadPolicy(CopyPolicy(start: base, length: 1 << 20, source: mem),
                                                                window: .adaptive(minPages: 1, maxPages: 16)), base: base)
        // The served-range lookup against the single-start check the policies used before
        // ServedRange (same run, same batch): the ratio is what the bookkeeping costs.
        let (plain, _) = measure("baseline: single-start copy", SingleStartCopy(start: base, length: 1 << 20, source: mem), base: base)
        let (ranged, _) = measure("CopyPolicy(MemorySource) again", CopyPolicy(start: base, length: 1 << 20, source: mem), base: base)
        print(String(format: "CopyPolicy / single-start copy: %.2fx", ranged / plain))
        let donor = try MappedRegion.donor(length: 1 << 20)
        _ = measure("MovePolicy", try MovePolicy(start: base, length: 1 << 20, donor: donor), base: base)
        let router = try RouterPolicy([.init(start: base, length: 1 << 20, policy: ZeroFillPolicy(start: base, length: 1 << 20)),
                                       .init(start: base + (2 << 20), length: 1 << 20, policy: ZeroFillPolicy(start: base, length: len))])
        _ = measure("Router(2 routes, ZeroFill)", router, base: base)
    }
}

/// The copy policy as it was before ``ServedRange``: one atomic start, one compare.
final class SingleStartCopy: FaultPolicy {
    let start: Atomic<UInt>
    let length: Int
    let source: any PageSource
    init(start: UInt, length: Int, source: any PageSource) {
        self.start = Atomic(start)
        self.length = length
        self.source = source
    }
    var scratchBytes: Int { basePageSize }
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        let base = start.load(ordering: .relaxed)
        guard fault.address >= base, fault.address - base < UInt(length) else { throw UffdError(.argument, .badAddress) }
        let page = fault.address & ~UInt(basePageSize - 1)
        let p = try source.bytes(at: Int(page - base), count: basePageSize, scratch: context.scratch)
        return .copy(from: UInt(bitPattern: p), to: page, length: basePageSize)
    }
}
