import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// The C prefetch claims of the deferred table (cuffd_deferred_claim / _abandon /
/// _claims_wait / _claim_result) on a real userfaultfd, without a handler: every return code.
/// No thread ever faults here (nothing would serve it); memory is read only where a claim or
/// UFFDIO_ZEROPAGE installed it.
final class DeferredClaimTableTests: XCTestCase {
    func testClaimCompleteAbandonAndCancel() throws {
        let ps = basePageSize
        let r = try MappedRegion(.anonymous(), length: 16 * ps)
        let uffd = try Userfaultfd()
        _ = try uffd.register(r, modes: .missing)
        var d: OpaquePointer? = nil
        XCTAssertEqual(cuffd_deferred_create(uffd.fd, 4, FaultHandler.Options().fallback.rawValue, uffd.features.rawValue, &d), 0)
        let t = try XCTUnwrap(d)
        defer { cuffd_deferred_destroy(t) }
        let base = UInt64(r.address)
        let slots = UnsafeMutablePointer<cuffd_prefetch_result>.allocate(capacity: 4)
        defer { slots.deallocate() }
        var tok = [UInt64](repeating: 0, count: 4)

        XCTAssertEqual(cuffd_deferred_claim(t, base + 1, UInt64(2 * ps), UInt64(ps), 0, slots, &tok[0]), -EINVAL, "misaligned")
        XCTAssertEqual(cuffd_deferred_claim(t, base, UInt64(2 * ps), UInt64(ps), 0, slots, &tok[0]), 1)
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(ps), UInt64(2 * ps), UInt64(ps), 0, slots + 1, &tok[1]), 0,
                       "overlaps the claim in flight: nothing claimed")
        // Capacity 4 with 2 entries kept for faults: one more claim, then ENOSPC.
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(4 * ps), UInt64(2 * ps), UInt64(ps), 2, slots + 1, &tok[1]), 1)
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(8 * ps), UInt64(2 * ps), UInt64(ps), 2, slots + 2, &tok[2]), -ENOSPC)
        XCTAssertEqual(cuffd_deferred_claims_wait(t, 3, 0), 2, "two claims in flight")
        XCTAssertEqual(cuffd_deferred_claims_wait(t, 2, 1_000_000), 2, "timed out: still two")

        // A page of the third claim is already there (UFFDIO_ZEROPAGE): kept, counted, the rest copied.
        var done: Int64 = 0
        XCTAssertEqual(cuffd_zeropage(uffd.fd, base + UInt64(9 * ps), UInt64(ps), 0, &done), 0)
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(8 * ps), UInt64(2 * ps), UInt64(ps), 0, slots + 2, &tok[2]), 1)

        let bytes = UnsafeMutableRawPointer.allocate(byteCount: 2 * ps, alignment: ps)
        defer { bytes.deallocate() }
        memset(bytes, 0xA5, 2 * ps)
        var out = cuffd_prefetch_result()
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots, &out), 0, "in flight")
        XCTAssertEqual(cuffd_deferred_complete(t, tok[0], UInt64(UInt(bitPattern: bytes)), nil, nil), Int32(CUFFD_OUTCOME_RESOLVED.rawValue))
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots, &out), 1)
        XCTAssertEqual(out.outcome, Int32(CUFFD_OUTCOME_RESOLVED.rawValue))
        XCTAssertEqual(out.copied, Int64(2 * ps))
        XCTAssertEqual(out.joined, 0)
        XCTAssertEqual(r.pointer.load(fromByteOffset: ps + 7, as: UInt8.self), 0xA5, "installed")
        XCTAssertEqual(cuffd_deferred_complete(t, tok[0], UInt64(UInt(bitPattern: bytes)), nil, nil), -EALREADY,
                       "a second finish does nothing")

        XCTAssertEqual(cuffd_deferred_complete(t, tok[2], UInt64(UInt(bitPattern: bytes)), nil, nil), Int32(CUFFD_OUTCOME_EXISTED.rawValue))
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots + 2, &out), 1)
        XCTAssertEqual(out.existed_pages, 1)
        XCTAssertEqual(out.copied, Int64(ps))
        XCTAssertEqual(r.pointer.load(fromByteOffset: 8 * ps, as: UInt8.self), 0xA5)
        XCTAssertEqual(r.pointer.load(fromByteOffset: 9 * ps, as: UInt8.self), 0, "the existing page was kept")

        // Abandoned: nothing installed, the error in the slot, later finishes refused.
        XCTAssertEqual(cuffd_deferred_abandon(t, tok[1], ETIMEDOUT), 0)
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots + 1, &out), 1)
        XCTAssertEqual(out.outcome, Int32(CUFFD_OUTCOME_FAILED.rawValue))
        XCTAssertEqual(out.error, ETIMEDOUT)
        XCTAssertEqual(out.copied, 0)
        XCTAssertEqual(cuffd_deferred_abandon(t, tok[1], ETIMEDOUT), -ECANCELED)
        XCTAssertEqual(cuffd_deferred_complete(t, tok[1], UInt64(UInt(bitPattern: bytes)), nil, nil), -ECANCELED)
        // A failed fetch of a claim is dropped the same way (no fallback): -ECANCELED to the source.
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(4 * ps), UInt64(2 * ps), UInt64(ps), 0, slots + 1, &tok[1]), 1)
        XCTAssertEqual(cuffd_deferred_fail(t, tok[1], EIO, nil, nil), -ECANCELED)
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots + 1, &out), 1)
        XCTAssertEqual(out.error, EIO)
        var st = cuffd_deferred_stats()
        cuffd_deferred_get_stats(t, &st)
        XCTAssertEqual(st.fallbacks, 0, "never the fallback for a claim")
        XCTAssertEqual(st.fetches, 0, "claims are not faults' fetches")
        XCTAssertEqual(st.in_flight, 0)

        // Cancel: waits refuse, claims refuse, a claim in flight is woken and never written.
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(12 * ps), UInt64(2 * ps), UInt64(ps), 0, slots + 3, &tok[3]), 1)
        XCTAssertEqual(cuffd_deferred_cancel(t), 1)
        XCTAssertEqual(cuffd_deferred_claims_wait(t, 1, 0), -ESHUTDOWN)
        XCTAssertEqual(cuffd_deferred_claim(t, base + UInt64(14 * ps), UInt64(ps), UInt64(ps), 0, slots, &tok[0]), -ESHUTDOWN)
        XCTAssertEqual(cuffd_deferred_complete(t, tok[3], UInt64(UInt(bitPattern: bytes)), nil, nil), -ECANCELED)
        XCTAssertEqual(cuffd_deferred_abandon(t, tok[3], EIO), -ECANCELED)
        XCTAssertEqual(cuffd_deferred_claim_result(t, slots + 3, &out), 0, "a cancelled claim's slot is never written")
    }
}
