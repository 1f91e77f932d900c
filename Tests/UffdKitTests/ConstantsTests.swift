import CUffd
import XCTest
@testable import UffdKit

/// Swift enums whose raw values must equal C constants (Swift needs literal raw values, so
/// they cannot be built from the C names): each one pinned here. Features, RegisterMode,
/// Ioctls and the stats' event slots are built from the C names directly.
final class ConstantsTests: XCTestCase {
    func testResolutionOperationsAreTheCOps() {
        let c: [Resolution.Operation: cuffd_op] = [
            .none: CUFFD_OP_NONE, .copy: CUFFD_OP_COPY, .zeropage: CUFFD_OP_ZEROPAGE, .move: CUFFD_OP_MOVE,
            .continue: CUFFD_OP_CONTINUE, .unprotect: CUFFD_OP_UNPROTECT, .wake: CUFFD_OP_WAKE,
            .poison: CUFFD_OP_POISON, .fail: CUFFD_OP_FAIL, .deferred: CUFFD_OP_DEFER,
        ]
        XCTAssertEqual(Resolution.Operation.allCases.count, Int(CUFFD_OP_COUNT.rawValue), "a C op without a Swift case")
        for op in Resolution.Operation.allCases {
            XCTAssertEqual(op.rawValue, c[op]?.rawValue, "\(op)")
        }
    }

    func testFallbacksAreTheCFallbacks() {
        XCTAssertEqual(FaultHandler.Fallback.allCases.count, 3)
        for f in FaultHandler.Fallback.allCases {
            XCTAssertEqual(UInt32(f.rawValue), f.cValue.rawValue, "\(f)")
        }
    }

    func testStatsReadEventSlotsByName() {
        var s = cuffd_loop_stats()
        withUnsafeMutableBytes(of: &s.events) { raw in
            let ev = raw.bindMemory(to: UInt64.self)
            ev[Int(CUFFD_EVENT_SLOT_FORK.rawValue)] = 1
            ev[Int(CUFFD_EVENT_SLOT_REMAP.rawValue)] = 2
            ev[Int(CUFFD_EVENT_SLOT_REMOVE.rawValue)] = 3
            ev[Int(CUFFD_EVENT_SLOT_UNMAP.rawValue)] = 4
            ev[Int(CUFFD_EVENT_SLOT_OTHER.rawValue)] = 5
        }
        var h = HandlerStats()
        h.add(s)
        XCTAssertEqual([h.forkEvents, h.remapEvents, h.removeEvents, h.unmapEvents, h.otherEvents], [1, 2, 3, 4, 5])
    }

    func testBitSetsNameTheKernelsBits() {
        XCTAssertEqual(Features.move.names, ["MOVE"])
        XCTAssertEqual(Features.eventFork.names, ["EVENT_FORK"])
        XCTAssertEqual(Ioctls.copy.names, ["COPY"])
        XCTAssertEqual(Ioctls.poison.names, ["POISON"])
        XCTAssertEqual(RegisterMode([.missing, .minor]).description, "missing|minor")
    }
}

/// A userfaultfd adopted from its opener (another process, a fork event).
final class AdoptedUserfaultfdTests: XCTestCase {
    func testAdoptedFdServesLikeTheOriginal() throws {
        let opened = try Userfaultfd(features: [.exactAddress])
        let fd = dup(opened.fd)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let adopted = Userfaultfd(adopting: fd, features: opened.features)
        XCTAssertEqual(adopted.features, opened.features)
        XCTAssertTrue(adopted.ioctls.isSuperset(of: [.register, .unregister, .api]))
        let r = try MappedRegion(.anonymous(), length: 2 * basePageSize)
        let mask = try adopted.register(r, modes: .missing)
        XCTAssertTrue(mask.contains(.copy))
        XCTAssertEqual(try adopted.zeropage(r.address, length: basePageSize), basePageSize)
        adopted.close()
        XCTAssertEqual(adopted.fd, -1)
    }
}
