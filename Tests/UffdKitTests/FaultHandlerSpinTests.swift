import CUffd
import XCTest
@testable import UffdKit

#if canImport(Glibc)
import Glibc
#endif

final class FaultHandlerSpinTests: XCTestCase {
    /// A busy-polling reader must notice stop() without using up its spin budget (20M spins
    /// of read + sched_yield: stop() took 31 s before the loop checked the stop fd, 29 ms after).
    func testStopIsPromptWhileBusyPolling() throws {
        let r = try MappedRegion(.anonymous(), length: 16 * basePageSize)
        let u = try Userfaultfd()
        _ = try u.register(r, modes: .missing)
        var o = FaultHandler.Options()
        o.spinPolls = 20_000_000
        let h = FaultHandler(uffd: u, policy: ZeroFillPolicy(region: r), options: o)
        try h.start()
        usleep(20_000) // the reader is spinning now
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        h.stop()
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let ms = Double(t1.tv_sec - t0.tv_sec) * 1e3 + Double(t1.tv_nsec - t0.tv_nsec) / 1e6
        XCTAssertFalse(h.isRunning)
        XCTAssertLessThan(ms, 1000, "stop() waited \(ms) ms for a spinning reader")
    }
}
