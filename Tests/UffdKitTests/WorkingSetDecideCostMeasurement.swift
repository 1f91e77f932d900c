import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// What working-set tracking adds to the fault path: the decide trampoline over batches of 64
/// synthetic faults on distinct pages (each a first fault), CopyPolicy over ZeroSource alone and
/// wrapped in WorkingSetPolicy (recording, and not recording with a prefetch list published),
/// interleaved in one run. No kernel involved. Not a timed test: it asserts nothing about speed
/// and only runs when asked (`UFFDKIT_MEASURE=1`, release build with -enable-testing).
final class WorkingSetDecideCostMeasurement: XCTestCase {
    static let base: UInt = 0x7000_0000_0000
    static let length = 1 << 30

    func measure(_ policy: any FaultPolicy, passes: Int) -> Double {
        let sink = HandlerSink(options: .init())
        let r = Reader(index: 0, files: nil, ready: nil, deferred: nil, features: [], userModeOnly: true, policy: policy, batch: 64,
                       slot: (policy.scratchBytes + 4095) / 4096 * 4096, cpu: nil, options: .init(), sink: sink)!
        let n = 64
        var msgs = [uffd_msg](repeating: uffd_msg(), count: n)
        var res = [cuffd_resolution](repeating: cuffd_resolution(), count: n)
        let ctx = Unmanaged.passUnretained(r).toOpaque()
        let pages = Self.length / 4096
        var check: UInt64 = 0
        var page = 0
        let t0 = cuffd_now_ns()
        for _ in 0..<passes {
            for i in 0..<n {
                msgs[i].event = UInt8(UFFD_EVENT_PAGEFAULT)
                msgs[i].arg.pagefault.address = UInt64(Self.base) + UInt64((page % pages) * 4096 + 123)
                page += 1
            }
            msgs.withUnsafeBufferPointer { m in
                res.withUnsafeMutableBufferPointer { rr in decideTrampoline(ctx, m.baseAddress, rr.baseAddress, n) }
            }
            check &+= res[n - 1].dst
        }
        let t1 = cuffd_now_ns()
        XCTAssertNotEqual(check, 0)
        XCTAssertEqual(res[0].op, UInt32(Resolution.Operation.copy.rawValue))
        return Double(t1 - t0) / Double(passes * n)
    }

    func testMeasureTrackingCost() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] != nil else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 (and build with -c release -Xswiftc -enable-testing) to measure")
        }
        let source = ZeroSource(length: Self.length)
        let passes = Self.length / 4096 / 64 // every page once per measurement: all first faults
        var plain: [Double] = [], recording: [Double] = [], prefetching: [Double] = []
        for _ in 0..<5 {
            let range = ServedRange(start: Self.base, length: Self.length)
            plain.append(measure(CopyPolicy(range: range, source: source), passes: passes))
            let rec = try WorkingSetTracker(range: range, recording: true)
            recording.append(measure(WorkingSetPolicy(CopyPolicy(range: range, source: source), tracker: rec), passes: passes))
            XCTAssertEqual(rec.faultedPages, Self.length / 4096)
            let pf = try WorkingSetTracker(range: range, recording: false)
            XCTAssertTrue(pf.publishRanks(Array(stride(from: 0, to: Self.length / 4096, by: 2))))
            prefetching.append(measure(WorkingSetPolicy(CopyPolicy(range: range, source: source), tracker: pf), passes: passes))
        }
        func med(_ a: [Double]) -> Double { a.sorted()[a.count / 2] }
        print(String(format: "decide CopyPolicy(ZeroSource): median %.1f ns/fault (min %.1f)", med(plain), plain.min()!))
        print(String(format: "decide WorkingSetPolicy recording: median %.1f ns/fault (min %.1f), %.2fx", med(recording), recording.min()!, med(recording) / med(plain)))
        print(String(format: "decide WorkingSetPolicy prefetch list: median %.1f ns/fault (min %.1f), %.2fx", med(prefetching), prefetching.min()!, med(prefetching) / med(plain)))
    }
}
