import CUffd
import Foundation
import Synchronization
import XCTest
@testable import UffdKit

/// A policy that zero-fills and, on its first fault, stops the handler running it.
private final class StopOnFirstFault: FaultPolicy, @unchecked Sendable {
    let region: MappedRegion
    let handler = Mutex<FaultHandler?>(nil)
    let stopped = Atomic<Bool>(false)
    init(region: MappedRegion) { self.region = region }

    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if !stopped.exchange(true, ordering: .relaxed), let h = handler.withLock({ $0 }) {
            h.stop()
        }
        return .zeropage()
    }
}

final class StopFromPolicyTests: XCTestCase {
    /// stop() from inside a policy (on a reader thread) must not wait for that reader itself:
    /// the policy's own fault is still resolved, and the handler ends.
    func testStopCalledFromAPolicyDoesNotDeadlock() throws {
        let r = try MappedRegion(.anonymous(), length: 16 * basePageSize)
        let policy = StopOnFirstFault(region: r)
        var options = FaultHandler.Options()
        options.readers = 2
        let s = try Session(r, options: options) { _ in policy }
        policy.handler.withLock { $0 = s.handler }
        let base = r.address
        let finished = s.run(20) {
            // The first fault stops the handler from its reader thread and is zero-filled.
            let v = UnsafePointer<UInt8>(bitPattern: base)!.pointee
            XCTAssertEqual(v, 0)
        }
        XCTAssertTrue(finished)
        XCTAssertTrue(policy.stopped.load(ordering: .relaxed))
        XCTAssertFalse(s.handler.isRunning)
        // The detached reader closes the stop fd when its loop ends; closing the uffd then lets
        // the untouched pages fault normally.
        _ = s.finish()
        let sum = touchSumExpected(UnsafeRawPointer(bitPattern: base)!, 16 * basePageSize)
        XCTAssertEqual(sum, 0)
    }
}
