import CUffd
import CUffdTestSupport
import Synchronization
import SystemPackage
import XCTest
@testable import UffdKit

final class UserfaultfdTests: XCTestCase {
    func testProbeReportsFeaturesWithNames() throws {
        let f = try Userfaultfd.probe()
        XCTAssertTrue(f.contains(.eventFork), "\(f)")
        XCTAssertTrue(f.description.contains("EVENT_FORK"), f.description)
        XCTAssertEqual(RegisterMode([.missing, .writeProtect]).description, "missing|writeProtect")
        XCTAssertEqual(Ioctls([.copy, .wake]).description, "[WAKE, COPY]")
    }

    func testOpenGrantsRequestedFeaturesAndRegisterReportsRangeIoctls() throws {
        try require([.eventRemove, .threadID])
        let u = try Userfaultfd(features: [.eventRemove, .threadID])
        XCTAssertEqual(u.features, [.eventRemove, .threadID])
        XCTAssertTrue(u.userModeOnly)
        XCTAssertTrue(u.ioctls.contains(.register), "\(u.ioctls)")
        let r = try MappedRegion(.anonymous(), length: 16 * basePageSize)
        let ioctls = try u.register(r, modes: .missing)
        XCTAssertTrue(ioctls.isSuperset(of: [.copy, .zeropage, .wake]), "\(ioctls)")
        try u.unregister(r.address, length: r.length)
    }

    func testRegisterMisalignedExplainsWhatToDo() throws {
        let u = try Userfaultfd()
        let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
        XCTAssertThrowsError(try u.register(r.address + 1, length: basePageSize, modes: .missing)) { e in
            let e = e as! UffdError
            XCTAssertEqual(e.operation, .register)
            XCTAssertEqual(e.errno, .invalidArgument)
            XCTAssertTrue(e.description.contains("misaligned"), e.description)
        }
        // Minor mode on anonymous memory is not supported.
        XCTAssertThrowsError(try u.register(r, modes: .minor)) { e in
            XCTAssertEqual((e as! UffdError).errno, .invalidArgument)
        }
    }

    func testApiRefusesUnknownFeature() {
        XCTAssertThrowsError(try Userfaultfd(features: Features(rawValue: 1 << 62))) { e in
            let e = e as! UffdError
            XCTAssertEqual(e.operation, .api)
            XCTAssertTrue(e.description.contains("bit 62"), e.description)
        }
    }

    func testVerbsWithoutHandler() throws {
        try require([.move, .poison])
        let ps = basePageSize
        let u = try Userfaultfd(features: [.move, .poison])
        let r = try MappedRegion(.anonymous(), length: 8 * ps)
        try u.register(r, modes: .missing)
        var src = [UInt8](repeating: 0xAB, count: ps)
        // COPY populates; a second COPY on the same page is EEXIST with 0 bytes done.
        let n = try src.withUnsafeBytes { try u.copy(to: r.address, from: UInt(bitPattern: $0.baseAddress!), length: ps) }
        XCTAssertEqual(n, ps)
        XCTAssertEqual(r.pointer.load(as: UInt8.self), 0xAB)
        XCTAssertThrowsError(try src.withUnsafeBytes { try u.copy(to: r.address, from: UInt(bitPattern: $0.baseAddress!), length: ps) }) { e in
            let e = e as! UffdError
            XCTAssertEqual(e.errno, .fileExists)
            XCTAssertEqual(e.bytesDone, 0)
            XCTAssertTrue(e.explanation.contains("already populated"))
        }
        // Partial progress: COPY over pages 1..3 where page 2 exists stops after page 1.
        src[0] = 1
        _ = try src.withUnsafeBytes { try u.copy(to: r.address + UInt(2 * ps), from: UInt(bitPattern: $0.baseAddress!), length: ps) }
        let big = [UInt8](repeating: 7, count: 3 * ps)
        XCTAssertThrowsError(try big.withUnsafeBytes { try u.copy(to: r.address + UInt(ps), from: UInt(bitPattern: $0.baseAddress!), length: 3 * ps) }) { e in
            XCTAssertEqual((e as! UffdError).bytesDone, ps)
        }
        XCTAssertEqual(try u.zeropage(r.address + 4 * UInt(ps), length: ps), ps)
        XCTAssertEqual((r.pointer + 4 * ps).load(as: UInt64.self), 0)
        // MOVE from an exclusive donor page.
        let donor = try MappedRegion.donor(length: ps)
        memset(donor.pointer, 0x5A, ps)
        XCTAssertEqual(try u.move(to: r.address + 5 * UInt(ps), from: donor.address, length: ps), ps)
        XCTAssertEqual((r.pointer + 5 * ps).load(as: UInt8.self), 0x5A)
        // Moving again from the (now empty) donor: ENOENT, explained as a source hole.
        XCTAssertThrowsError(try u.move(to: r.address + 6 * UInt(ps), from: donor.address, length: ps)) { e in
            let e = e as! UffdError
            XCTAssertEqual(e.errno, .noSuchFileOrDirectory)
            XCTAssertTrue(e.explanation.contains("hole"), e.explanation)
        }
        XCTAssertEqual(try u.poison(r.address + 7 * UInt(ps), length: ps), ps)
        var v: UInt8 = 0
        XCTAssertEqual(cuffd_read_catching_sigbus(r.pointer.assumingMemoryBound(to: UInt8.self) + 7 * ps, &v), 1)
        XCTAssertNoThrow(try u.wake(r.address, length: r.length))
    }

    func testWriteProtectAndUnprotect() throws {
        try require([.pagefaultFlagWP])
        let ps = basePageSize
        let u = try Userfaultfd(features: [.pagefaultFlagWP])
        let r = try MappedRegion(.anonymous(), length: 4 * ps)
        memset(r.pointer, 1, r.length)
        try u.register(r, modes: .writeProtect)
        try u.writeProtect(r.address, length: r.length)
        try u.unprotect(r.address, length: r.length)
        // Nobody reads the fd: a page left protected blocks the writer. The write runs on its
        // own thread; on a timeout closing the fd releases it and the test fails instead of hanging.
        let p = UInt(bitPattern: r.pointer), len = r.length
        let finished = withWatchdog(10, onTimeout: { u.close() }) {
            memset(UnsafeMutableRawPointer(bitPattern: p)!, 2, len)
        }
        XCTAssertTrue(finished, "a write to unprotected pages blocked (still write-protected)")
        for i in 0..<4 { XCTAssertEqual(r.pointer.load(fromByteOffset: i * ps, as: UInt8.self), 2) }
    }

    func testUnansweredFaultBlocksTheThread() {
        // In a child process: nobody reads its fd, so the touching thread must stay blocked.
        let rc = cuffd_child_blocks_when_unhandled(UInt64(basePageSize * 4), 300)
        XCTAssertEqual(rc, 1, "child was not blocked (rc \(rc))")
    }

    func testMappedRegionKinds() throws {
        let s = try MappedRegion(.shmem, length: 4 * basePageSize)
        XCTAssertNotNil(s.alias)
        s.alias!.storeBytes(of: 0x42, as: UInt8.self)
        XCTAssertEqual(s.pointer.load(as: UInt8.self), 0x42, "alias and view share pages")
        let a = try MappedRegion(.anonymous(thpAligned: true), length: 4 * MiB)
        XCTAssertEqual(a.address % UInt(2 * MiB), 0)
        XCTAssertNil(a.alias)
        XCTAssertThrowsError(try MappedRegion(.anonymous(), length: 0))
    }

    /// hugetlb-private: a hugetlb memfd mapped private with a shared alias. Huge pages; a write
    /// through the view stays private (copy-on-write), a write through the alias fills the file
    /// the view reads until it writes; ZeroFillPolicy copies zeros there too (no ZEROPAGE on
    /// hugetlb) and a handler serves it.
    func testHugetlbPrivateRegion() throws {
        guard let huge = hugePageSize else { throw XCTSkip("no huge page size reported") }
        let len = 2 * huge
        let ran = try withHugePages(4 * len / huge + 1) {
            let r = try MappedRegion(.hugetlbPrivate, length: len)
            XCTAssertTrue(r.kind.isHugetlb && r.kind.isPrivateFile)
            XCTAssertEqual(r.pageSize, huge)
            XCTAssertNotNil(r.alias)
            r.alias!.storeBytes(of: 0x11, as: UInt8.self)
            XCTAssertEqual(r.pointer.load(as: UInt8.self), 0x11, "the private view reads the file")
            r.pointer.storeBytes(of: 0x22, as: UInt8.self)
            XCTAssertEqual(r.alias!.load(as: UInt8.self), 0x11, "a private write reached the file")

            let z = try MappedRegion(.hugetlbPrivate, length: len)
            let policy = ZeroFillPolicy(region: z)
            XCTAssertTrue(policy.copiesZeros, "hugetlb-private has no UFFDIO_ZEROPAGE: zeros must be copied")
            let u = try Userfaultfd(features: [.missingHugetlbfs])
            try u.register(z, modes: .missing)
            // The zero-fill fallback (itself a copy of zeros here) keeps a wrong policy from
            // killing the process with SIGBUS: it shows up as fallbacks instead.
            var o = FaultHandler.Options()
            o.fallback = .zeroFill
            let h = FaultHandler(uffd: u, policy: policy, options: o)
            try h.start()
            let base = z.address
            let done = withWatchdog(20, onTimeout: { u.close(); h.stop() }) {
                _ = touch(base, length: len, threads: 2, stride: 64 << 10)
            }
            h.stop()
            XCTAssertTrue(done)
            XCTAssertEqual(wordSum(z.pointer, len), 0)
            let st = h.stats()
            XCTAssertEqual(st.fallbacks + st.failures, 0, "\(st)")
            XCTAssertGreaterThan(st.missingFaults, 0)
        }
        if !ran { throw XCTSkip("cannot reserve huge pages through /proc/sys/vm/nr_hugepages") }
    }
}

final class FaultDetailTests: XCTestCase {
    func testExactAddressAndThreadIDReachThePolicy() throws {
        try require([.exactAddress, .threadID])
        final class Recorder: FaultPolicy {
            let seen = Mutex<[Fault]>([])
            func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
                seen.withLock { $0.append(fault) }
                return .zeropage()
            }
        }
        let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
        let rec = Recorder()
        let s = try Session(r, features: [.exactAddress, .threadID]) { _ in rec }
        let target = r.address + UInt(basePageSize) + 123
        let tid = Box<Int32>(0)
        s.run {
            tid.update { $0 = cuffd_gettid() }
            UnsafeMutablePointer<UInt8>(bitPattern: target)!.pointee = 1 // a write
        }
        _ = s.finish()
        let f = try XCTUnwrap(rec.seen.withLock { $0.first })
        XCTAssertEqual(f.address, r.address + UInt(basePageSize))
        XCTAssertEqual(f.exactAddress, target)
        XCTAssertEqual(f.kind, .missing)
        XCTAssertTrue(f.isWrite)
        XCTAssertEqual(f.threadID, tid.value)
        XCTAssertEqual((r.pointer + basePageSize + 123).load(as: UInt8.self), 1)
    }

    func testErrorExplanationsSayWhatToDo() {
        let open = UffdError(.open, .notPermitted)
        XCTAssertTrue(open.description.contains("vm.unprivileged_userfaultfd=1"), open.description)
        XCTAssertTrue(open.description.contains("/dev/userfaultfd"))
        XCTAssertTrue(open.description.contains("user-mode-only"))
        XCTAssertTrue(UffdError(.move, .resourceBusy).explanation.contains("MADV_DONTFORK"))
        XCTAssertTrue(UffdError(.copy, .noSuchProcess).explanation.contains("gone"))
        let partial = UffdError(.copy, .fileExists, bytesDone: 8192, detail: "0x1000+16384")
        XCTAssertTrue(partial.description.hasPrefix("copy failed: "), partial.description)
        XCTAssertTrue(partial.description.contains("after 8192 bytes"))
        XCTAssertTrue(partial.description.contains("0x1000+16384"))
    }

    func testCopyIntoShmemPrivate() throws {
        try require([.missingShmem])
        let size = 64 * MiB
        let r = try MappedRegion(.shmemPrivate, length: size)
        let src = MemorySource(length: size) { fillPattern($0.baseAddress!, $0.count, seed: 50) }
        let s = try Session(r, features: [.missingShmem]) { _ in CopyPolicy(region: r, source: src) }
        let base = r.address
        s.run { _ = touch(base, length: size, threads: 4) }
        let st = s.finish()
        XCTAssertEqual(memcmp(r.pointer, src.buffer.baseAddress!, size), 0)
        XCTAssertEqual(st.resolutions[.copy], UInt64(size / basePageSize))
        // Private: the copies are anonymous pages of this mapping, the file stays empty.
        XCTAssertEqual(wordSum(r.alias!, size), 0)
    }
}

final class ManualLoopTests: XCTestCase {
    /// Without a FaultHandler: read the fault message, resolve it with COPY, the thread goes on.
    func testReadMessagesAndResolveByHand() throws {
        let ps = basePageSize
        let u = try Userfaultfd()
        let r = try MappedRegion(.anonymous(), length: 4 * ps)
        try u.register(r, modes: .missing)
        let base = r.address
        let value = Box<UInt8>(0)
        let done = DispatchSemaphore(value: 0)
        Thread {
            value.update { $0 = UnsafePointer<UInt8>(bitPattern: base + UInt(2 * ps) + 5)!.pointee }
            done.signal()
        }.start()
        XCTAssertTrue(u.waitReadable(timeoutMilliseconds: 10_000))
        let msgs = try u.readMessages()
        guard case .fault(let f)? = msgs.first else {
            XCTFail("expected a fault, got \(msgs)")
            u.close()
            return
        }
        XCTAssertEqual(f.address, base + UInt(2 * ps))
        XCTAssertNil(f.exactAddress)
        XCTAssertFalse(f.isWrite)
        let page = [UInt8](repeating: 0x3C, count: ps)
        _ = try page.withUnsafeBytes { try u.copy(to: f.address, from: UInt(bitPattern: $0.baseAddress!), length: ps) }
        if done.wait(timeout: .now() + 10) == .timedOut {
            XCTFail("the thread was not woken")
            u.close()
            _ = done.wait(timeout: .now() + 10)
        }
        XCTAssertEqual(value.value, 0x3C)
        XCTAssertEqual(try u.readMessages().count, 0)
    }
}
