import CUffd
import CUffdTestSupport
import Foundation
import SystemPackage
import XCTest
@testable import UffdKit

/// Policy follow-ups to issue 9: faults on memory that left the served range are gone (not
/// policy failures), PoisonPolicy follows remaps, a partly done 2 MiB MOVE goes on from where
/// it stopped.
final class PolicyFollowUpTests: XCTestCase {
    let ps = basePageSize

    /// A context for calling a policy outside a handler.
    func context(reader: Int = 0) -> FaultContext { FaultContext(fd: -1, features: [], reader: reader) }

    func fault(_ address: UInt, _ kind: Fault.Kind = .missing) -> Fault {
        Fault(address: address, kind: kind, isWrite: false)
    }

    // MARK: Gone, not outside

    /// The range remembers where its bytes left (unmapped parts, the old place of remapped
    /// parts); an address it never covered, or one it holds again, is not gone.
    func testServedRangeRemembersAddressesItsBytesLeft() {
        let base: UInt = 0x7000_0000_0000, len = 16 * ps
        let r = ServedRange(start: base, length: len)
        XCTAssertFalse(r.isGone(base))
        XCTAssertTrue(r.unmap(start: base + UInt(2 * ps), end: base + UInt(4 * ps)))
        XCTAssertTrue(r.isGone(base + UInt(2 * ps)))
        XCTAssertTrue(r.isGone(base + UInt(4 * ps) - 1))
        XCTAssertFalse(r.isGone(base + UInt(4 * ps)), "still served")
        XCTAssertFalse(r.isGone(base - UInt(ps)), "never in the range")
        XCTAssertFalse(r.isGone(base + UInt(len)), "never in the range")
        // Pages 8..<12 move away: their old place is gone, their new place is served.
        let to: UInt = 0x7100_0000_0000
        XCTAssertTrue(r.remap(from: base + UInt(8 * ps), to: to, length: 4 * ps))
        XCTAssertTrue(r.isGone(base + UInt(9 * ps)))
        XCTAssertFalse(r.isGone(to + UInt(ps)))
        XCTAssertEqual(r.leftBehind.map { $0.start..<$0.end },
                       [base + UInt(2 * ps)..<base + UInt(4 * ps), base + UInt(8 * ps)..<base + UInt(12 * ps)])
        // Moved back: served again, no longer left behind.
        XCTAssertTrue(r.remap(from: to, to: base + UInt(8 * ps), length: 4 * ps))
        XCTAssertFalse(r.isGone(base + UInt(9 * ps)))
        XCTAssertEqual(r.offset(of: base + UInt(9 * ps)), 9 * ps)
        XCTAssertTrue(r.isGone(to + UInt(ps)), "the place it left is gone now")
        // A forked child's copy starts with the same memory of what left.
        XCTAssertTrue(r.copy().isGone(base + UInt(3 * ps)))
    }

    /// Every range-keeping policy answers a fault on an unmapped part with the gone answer
    /// (ZEROPAGE of the page: ENOENT where nothing is mapped, counted `gone`), and still throws
    /// for an address its range never covered. Before: "outside the policy's range" for both.
    func testPoliciesAnswerUnmappedPartsAsGone() throws {
        let base: UInt = 0x7000_0000_0000, len = 8 * ps
        let gone = base + UInt(6 * ps) + 123, never = base + UInt(len)
        let unmap = Event.unmap(start: base + UInt(4 * ps), end: base + UInt(len))
        let donor = try MappedRegion.donor(length: len)
        let copy = CopyPolicy(start: base, length: len, source: PatternSource(length: len))
        let policies: [(String, any FaultPolicy)] = [
            ("copy", copy),
            ("readahead", ReadaheadPolicy(CopyPolicy(start: base, length: len, source: PatternSource(length: len)), window: .fixed(pages: 4))),
            ("move", try MovePolicy(start: base, length: len, donor: donor)),
            ("writeTracker", WriteTrackerPolicy(start: base, length: len)),
            ("router", try RouterPolicy([.init(start: base, length: len, policy: CopyPolicy(start: base, length: len, source: PatternSource(length: len)))])),
            ("poison", PoisonPolicy(pages: [base], otherwise: CopyPolicy(start: base, length: len, source: PatternSource(length: len)))),
        ]
        for (name, p) in policies {
            p.handle(event: unmap, context: context())
            let kind: Fault.Kind = name == "writeTracker" ? .writeProtect : .missing
            // MovePolicy answers with the faulting base page (its granule may be huge).
            XCTAssertEqual(try p.resolve(fault(gone & ~UInt(ps - 1), kind), context: context()),
                           name == "move" ? .zeropage() : .zeropage(gone & ~UInt(ps - 1), length: ps), name)
            XCTAssertThrowsError(try p.resolve(fault(never, kind), context: context()), name)
        }
        // Still served: the usual answer.
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: ps, alignment: ps)
        defer { scratch.deallocate() }
        let ctx = FaultContext(fd: -1, features: [], scratch: scratch, scratchSize: ps)
        XCTAssertEqual(try copy.resolve(fault(base), context: ctx).operation, .copy)
    }

    /// On a real fd: a ZEROPAGE on an address with no mapping is ENOENT (what the handler counts
    /// as `gone`), so the gone answer cannot fill anything there.
    func testGoneAnswerMeetsNoMapping() throws {
        let len = 4 * ps
        let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let base = UInt(bitPattern: raw)
        let u = try Userfaultfd()
        try u.register(base, length: len, modes: .missing)
        let r = ServedRange(start: base, length: len)
        XCTAssertEqual(munmap(raw, len), 0)
        r.unmap(start: base, end: base + UInt(len))
        let answer = r.goneAnswer(fault(base + UInt(ps)))
        XCTAssertThrowsError(try u.zeropage(answer.start, length: answer.length)) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .noSuchFileOrDirectory, "\(e)")
        }
    }

    // MARK: PoisonPolicy follows remaps

    /// Poisoned pages move with an mremap of the memory holding them: at the new address the
    /// chosen page raises SIGBUS and the others are served; nothing is poisoned at the old
    /// place. Before: the page addresses stayed where they were chosen, so after the move the
    /// chosen page was filled with zeros (no SIGBUS).
    func testPoisonPolicyFollowsARemap() throws {
        try require([.poison, .eventRemap])
        let pages = 8, len = pages * ps, chosen = 3
        let raw = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        let target = mmap(nil, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(target, len) }
        let old = UInt(bitPattern: raw), tgt = UInt(bitPattern: target)
        let policy = PoisonPolicy(pages: [old + UInt(chosen * ps) + 17], otherwise: ZeroFillPolicy(start: old, length: len))
        XCTAssertEqual(policy.pages, [old + UInt(chosen * ps)])
        let u = try Userfaultfd(features: [.poison, .eventRemap])
        try u.register(old, length: len, modes: .missing)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let h = FaultHandler(uffd: u, policy: policy, options: o)
        try h.start()
        let ps = self.ps
        let got = Box<[Int32]>([])
        let ok = withWatchdog(30, onTimeout: { u.close(); h.stop() }) {
            _ = cuffd_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), UInt64(len), UnsafeMutableRawPointer(bitPattern: tgt))
            var out: [Int32] = []
            for p in 0..<pages {
                var v: UInt8 = 0
                out.append(cuffd_read_catching_sigbus(UnsafePointer<UInt8>(bitPattern: tgt + UInt(p * ps))!, &v))
            }
            got.update { $0 = out }
        }
        h.stop()
        u.close()
        XCTAssertTrue(ok, "a read blocked")
        XCTAssertEqual(policy.pages, [tgt + UInt(chosen * ps)], "the poisoned page did not follow the remap")
        XCTAssertEqual(got.value, (0..<pages).map { $0 == chosen ? 1 : 0 }, "1 = SIGBUS, 0 = read")
        let st = h.stats()
        XCTAssertEqual(st.resolutions[.poison], 1, "\(st)")
        XCTAssertEqual(st.resolutions[.zeropage], UInt64(pages - 1), "\(st)")
        XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
    }

    // MARK: A partly done 2 MiB move goes on

    /// A 2 MiB granule whose donor is in base pages, with a hole at donor page 5. The first
    /// fault (page 10) moves the granule: the kernel moves pages 0-4 and stops at the hole
    /// (ENOENT, a failure; the fallback's zeropage over the granule meets page 0 and only
    /// wakes). The granule is then partly moved: the re-fault on page 10 moves that page, and
    /// touching the whole granule moves every other page but the hole, which alone gets the
    /// fallback's zeros. Before: the failure reset the granule to "not moved", the re-fault
    /// moved it whole again, met page 0 (EEXIST: a wake) and left the granule "moving": the
    /// thread was woken forever (the watchdog fired).
    func testPartlyDoneHugeMoveGoesOnFromWhereItStopped() throws {
        try require([.move])
        let huge = 2 * MiB, hole = 5, first = 10, pages = huge / ps
        let r = try MappedRegion(.anonymous(thpAligned: true), length: huge)
        let donor = try MappedRegion.donor(length: huge, alignment: huge)
        try donor.advise(MADV_NOHUGEPAGE)
        for p in 0..<pages where p != hole { fillPattern(donor.pointer + p * ps, ps, seed: 83, from: p * ps) }
        let policy = try MovePolicy(region: r, donor: donor, granule: huge)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let s = try Session(r, features: [.move], options: o) { _ in policy }
        let base = r.address, ps = self.ps
        XCTAssertTrue(s.run(20) {
            _ = touch(base + UInt(first * ps), length: ps, threads: 1)
            _ = touch(base, length: huge, threads: 1)
        }, "the faulting thread was woken forever")
        let st = s.finish()
        for p in 0..<pages where p != hole { verifyPattern(r.pointer + p * ps, ps, seed: 83, offset: p * ps) }
        XCTAssertEqual(wordSum(r.pointer + hole * ps, ps), 0, "the hole got the fallback's zeros")
        let f = s.handler.failures()
        XCTAssertEqual(f.map(\.resolution), [.move(from: donor.address, to: base, length: huge),
                                             .move(from: donor.address + UInt(hole * ps), to: base + UInt(hole * ps), length: ps)], "\(f)")
        XCTAssertEqual(f.map(\.errno), [.noSuchFileOrDirectory, .noSuchFileOrDirectory])
        // The whole move, then one per page not moved by it (all but pages 0-4).
        XCTAssertEqual(st.resolutions[.move], UInt64(1 + pages - hole), "\(st)")
        XCTAssertEqual(st.fallbacks, 2, "\(st)")
        XCTAssertEqual(st.failures, 0, "\(st)")
        XCTAssertEqual(policy.movedGranules, 1)
    }
}
