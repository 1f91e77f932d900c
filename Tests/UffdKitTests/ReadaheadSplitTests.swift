import CUffd
import Foundation
import XCTest
@testable import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// A resolution window that crosses a VMA boundary inside the registered range (an mprotect
/// of one page splits the VMA): the kernel refuses the whole window with ENOENT. Decided: the
/// loop retries the faulting page alone, so the fault is resolved instead of woken onto the
/// same window forever.
final class ReadaheadSplitTests: XCTestCase {
    func testReadaheadWindowAcrossAnMprotectSplitResolvesTheFault() throws {
        let ps = basePageSize, pages = 16, len = pages * ps
        let r = try MappedRegion(.anonymous(), length: len)
        let s = try Session(r) { _ in ReadaheadPolicy(ZeroFillPolicy(region: r), window: .fixed(pages: 8)) }
        // Page 4 becomes its own VMA: every 8-page window around pages 0...11 crosses it.
        XCTAssertEqual(mprotect(UnsafeMutableRawPointer(bitPattern: r.address + UInt(4 * ps)), ps, PROT_READ), 0)
        let base = r.address
        let sum = Box<UInt64>(0)
        XCTAssertTrue(s.run(20) {
            var v: UInt64 = 0
            for p in [2, 4, 0, 7, 12, 15] { v &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(p * ps + 9))!.pointee) }
            sum.update { $0 = v }
        }, "the faulting thread spun on a window the kernel refuses")
        let st = s.finish()
        XCTAssertEqual(sum.value, 0)
        // A handful of faults, not hundreds of thousands of re-faults.
        XCTAssertLessThanOrEqual(st.missingFaults, UInt64(pages), "\(st)")
        XCTAssertEqual(st.gone, 0, "the faulting page was there: \(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }
}
