import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

/// A page source that is another memory area (the stress test's source area): zero-copy.
struct AreaSource: PageSource {
    let base: UInt
    let length: Int
    func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        UnsafeRawPointer(bitPattern: base + UInt(offset))!
    }
}

/// The stress profile: `make test` runs the short one, `make stress` (UFFDKIT_STRESS=long) the long one.
struct StressProfile {
    var basePages: Int
    var hugePages: Int
    var rounds: Int
    var roundMilliseconds: Int
    static let short = StressProfile(basePages: 1024, hugePages: 8, rounds: 8, roundMilliseconds: 200)
    /// The kernel's run_vmtests.sh sizes for hugetlb (64 huge pages).
    static let long = StressProfile(basePages: 16384, hugePages: 64, rounds: 48, roundMilliseconds: 1000)
    static var current: StressProfile { longStress ? .long : .short }
}

/// uffd-stress through UffdKit ("bounce"): the contents of a source area reach a registered
/// destination area through faults resolved by a multi-reader `FaultHandler` (CopyPolicy over
/// the source), while locking threads (2 per CPU) lock pages through a side array of mutexes
/// and increment per-page counters in the destination, and background threads (1 per CPU)
/// resolve every page themselves with `Userfaultfd.copy`, racing the handler (EEXIST both
/// ways). Then source and destination swap and the destination is emptied. Rounds vary page
/// choice (sequential, random, racing on the same pages), batch size and busy polling. At the
/// end every counter must equal its expected value and their sum the number of increments:
/// nothing lost, nothing doubled. A locking thread that does not come back is a failure; the
/// whole run is an isolated child killed by a watchdog.
final class StressTests: XCTestCase {
    func testStressAnon() throws { try stress(.anonymous(), wp: false) }
    func testStressAnonWriteProtect() throws { try stress(.anonymous(), wp: true) }
    func testStressShmem() throws { try stress(.shmem, wp: false) }
    func testStressShmemWriteProtect() throws { try stress(.shmem, wp: true) }
    func testStressShmemPrivate() throws { try stress(.shmemPrivate, wp: false) }
    func testStressShmemPrivateWriteProtect() throws { try stress(.shmemPrivate, wp: true) }
    func testStressHugetlb() throws { try stress(.hugetlb, wp: false) }
    func testStressHugetlbWriteProtect() throws { try stress(.hugetlb, wp: true) }
    func testStressHugetlbPrivate() throws { try stress(.hugetlbPrivate, wp: false) }
    func testStressHugetlbPrivateWriteProtect() throws { try stress(.hugetlbPrivate, wp: true) }

    func stress(_ kind: MappedRegion.Kind, wp: Bool) throws {
        let p = StressProfile.current
        let timeout = longStress ? 900 : 60
        if kind.isHugetlb {
            // Reserved by the parent (restored even when the child is killed); the child finds
            // them free. Two areas; a private one reserves its own pages besides the file's.
            try withHugePages((kind.isPrivateFile ? 4 : 2) * p.hugePages + 2) {
                try isolated(timeout: timeout) { try runStress(kind, wp: wp, profile: p) }
            }
        } else {
            try isolated(timeout: timeout) { try runStress(kind, wp: wp, profile: p) }
        }
    }

    func features(_ kind: MappedRegion.Kind, wp: Bool) -> Features {
        var f: Features = []
        switch kind {
        case .shmem, .shmemPrivate: f.insert(.missingShmem)
        case .hugetlb, .hugetlbPrivate: f.insert(.missingHugetlbfs)
        default: break
        }
        if wp {
            f.insert(.pagefaultFlagWP)
            if kind != .anonymous() && kind != .anonymous(thpAligned: true) { f.insert(.wpHugetlbfsShmem) }
        }
        return f
    }

    func runStress(_ kind: MappedRegion.Kind, wp: Bool, profile: StressProfile) throws {
        let want = features(kind, wp: wp)
        let offered = try Userfaultfd.probe()
        guard offered.isSuperset(of: want) else { throw relSkip("kernel does not offer \(want.subtracting(offered))") }
        let cpus = Swift.max(2, ProcessInfo.processInfo.activeProcessorCount)
        let ps = kind.isHugetlb ? (hugePageSize ?? 0) : basePageSize
        guard ps > 0 else { throw relSkip("no default huge page size") }
        let npages = kind.isHugetlb ? profile.hugePages : profile.basePages
        let len = npages * ps
        var src: MappedRegion
        var dst: MappedRegion
        do {
            src = try MappedRegion(kind, length: len)
            dst = try MappedRegion(kind, length: len)
        } catch {
            if kind.isHugetlb { throw relSkip("cannot map hugetlb memory: \(error)") }
            throw error
        }
        let uffd = try Userfaultfd(features: want)
        // The blocking-read rounds' fd: read(2) blocks on it (uffd-stress's read mode).
        let blockingUffd = try Userfaultfd(features: want, options: [])
        guard let state = rel_stress_create(UInt64(npages), UInt64(ps)) else { return XCTFail("rel_stress_create") }
        defer { rel_stress_destroy(state) }
        rel_stress_init_area(state, src.pointer)
        let modes: RegisterMode = wp ? [.missing, .writeProtect] : .missing
        // Shared file memory has a second view of the same pages: registered too, and every
        // page the background threads copy is copied again through it, which must say EEXIST.
        let sharedAlias = kind == .shmem || kind == .hugetlb

        var totalFaults: UInt64 = 0, handlerExisted: UInt64 = 0, wpFaults: UInt64 = 0
        var batchedReads: UInt64 = 0, batchedMessages: UInt64 = 0, blockingFaults: UInt64 = 0
        let backgroundCopied = Atomic<Int>(0), backgroundExisted = Atomic<Int>(0), aliasExisted = Atomic<Int>(0)
        let backgroundErrors = Locked<[String]>([])
        for round in 0..<profile.rounds {
            let pageMode = round % 3 == 0 ? REL_STRESS_RANDOM : round % 3 == 1 ? REL_STRESS_RACING : REL_STRESS_SEQUENTIAL
            let busyPoll = round & 1 == 1
            let blockingRead = round % 4 == 3
            let ru = blockingRead ? blockingUffd : uffd
            try ru.register(dst, modes: modes)
            let aliasBase = sharedAlias ? dst.alias.map { UInt(bitPattern: $0) } : nil
            if let a = aliasBase { try ru.register(a, length: len, modes: .missing) }
            // With several readers each read() takes `sharedBatch` messages (`batch` is the
            // single reader's): both are set, so the variation reaches the reads.
            let batch = round & 2 == 0 ? 16 : 1
            var handler: FaultHandler?
            var resolvers: OpaquePointer?
            if blockingRead {
                resolvers = rel_resolvers_start(blockingUffd.fd, Int32(cpus), dst.pointer, src.pointer,
                                                UInt64(len), UInt64(ps), wp)
                guard resolvers != nil else { return XCTFail("round \(round): no blocking-read resolver started") }
            } else {
                let policy = CopyPolicy(start: dst.address, length: len, source: AreaSource(base: src.address, length: len),
                                        pageSize: ps, writeProtected: wp)
                var o = FaultHandler.Options()
                o.readers = cpus
                o.batch = batch
                o.sharedBatch = batch
                o.spinPolls = busyPoll ? 200 : 0
                let h = FaultHandler(uffd: uffd, policy: policy, options: o)
                try h.start()
                handler = h
            }
            XCTAssertEqual(rel_stress_start(state, dst.pointer, Int32(2 * cpus), Int32(pageMode.rawValue), UInt64(round + 1)), 0)

            // Background resolvers: every page of their slice, paced over the round.
            let group = DispatchGroup()
            let dstBase = dst.address, srcBase = src.address
            let perThread = (npages + cpus - 1) / cpus
            let pause = UInt32(Swift.max(1, profile.roundMilliseconds * 1000 / Swift.max(1, perThread)))
            for t in 0..<cpus {
                group.enter()
                spawn {
                    defer { group.leave() }
                    var order = Array((t * perThread)..<Swift.min(npages, (t + 1) * perThread))
                    if round % 2 == 1 { order.shuffle() }
                    for page in order {
                        let off = UInt(page * ps)
                        var attempts = 0
                        while true {
                            do {
                                try ru.copy(to: dstBase + off, from: srcBase + off, length: ps, writeProtect: wp)
                                backgroundCopied.add(1, ordering: .relaxed)
                            } catch let e as UffdError where e.errno == .fileExists {
                                backgroundExisted.add(1, ordering: .relaxed)
                            } catch let e as UffdError where e.errno == .resourceTemporarilyUnavailable && attempts < 1000 {
                                attempts += 1
                                continue
                            } catch {
                                backgroundErrors.withLock { $0.append("page \(page): \(error)") }
                            }
                            break
                        }
                        // The page is in the file now: the same COPY through the other view is EEXIST.
                        if let a = aliasBase {
                            do {
                                try ru.copy(to: a + off, from: srcBase + off, length: ps)
                                backgroundErrors.withLock { $0.append("page \(page): COPY through the alias did not say EEXIST") }
                            } catch let e as UffdError where e.errno == .fileExists {
                                aliasExisted.add(1, ordering: .relaxed)
                            } catch {
                                backgroundErrors.withLock { $0.append("page \(page) alias: \(error)") }
                            }
                        }
                        usleep(pause)
                    }
                }
            }
            if wp {
                // Mid-bounce, protect again the half already mapped: the lockers' next writes
                // there are WP faults again, while misses elsewhere are still being resolved.
                usleep(UInt32(profile.roundMilliseconds * 500))
                do { try ru.writeProtect(dstBase, length: len / 2) } catch {
                    XCTFail("round \(round): re-protect the first half: \(error)")
                }
            }
            let backgroundDone = group.wait(timeout: .now() + .seconds(30)) == .success
            if backgroundDone {
                // Every page is mapped now. Zap the source while the resolvers may still be
                // copying from it (the kernel's uffd-stress does the same): a resolution that
                // still copies must get EEXIST, never write the zeros it read.
                try empty(src)
            }
            let lockersBack = rel_stress_stop(state, 10_000) == 0
            if !backgroundDone || !lockersBack {
                // Huge pages are machine-wide: when another process took the free ones, a COPY
                // finds none (the fallback then poisons the page). Say how the pool looked.
                let pool = kind.isHugetlb ? " [" + hugePoolSummary() + "]" : ""
                XCTFail("round \(round): \(backgroundDone ? "" : "background resolvers did not finish; ")"
                        + String(cString: rel_stress_error(state)) + pool)
                // Release whoever is still blocked so the child can exit and report.
                uffd.close()
                blockingUffd.close()
                handler?.stop()
                return
            }
            if let h = handler {
                h.stop()
                let st = h.stats()
                totalFaults += st.faults
                wpFaults += st.writeProtectFaults
                handlerExisted += st.existed
                // A read never returns more messages than the batch asked for.
                XCTAssertLessThanOrEqual(st.messages, st.reads * UInt64(batch), "round \(round): batch \(batch) \(st)")
                if batch > 1 {
                    batchedReads += st.reads
                    batchedMessages += st.messages
                }
                XCTAssertEqual(st.fallbacks + st.failures, 0, "round \(round): \(h.failures().prefix(3)) \(st)")
                XCTAssertTrue(h.loopErrors().isEmpty, "round \(round): \(h.loopErrors())")
            } else if let r = resolvers {
                var c = rel_resolver_counts()
                XCTAssertEqual(rel_resolvers_stop(r, &c), 0, "round \(round): a blocking-read resolver did not end")
                XCTAssertEqual(c.errors, 0, "round \(round): blocking-read resolvers: first error \(String(cString: strerror(-c.first_error)))")
                totalFaults += c.faults + c.wp_faults
                blockingFaults += c.faults + c.wp_faults
                wpFaults += c.wp_faults
                handlerExisted += c.existed
            }
            var err = String(cString: rel_stress_error(state))
            XCTAssertEqual(err, "", "round \(round)")
            if !err.isEmpty { return }
            try ru.unregister(dst.address, length: len)
            if let a = aliasBase { try ru.unregister(a, length: len) }
            // The whole area after every bounce, not only at the end.
            XCTAssertEqual(rel_stress_verify(state, dst.pointer), 0, "round \(round): " + String(cString: rel_stress_error(state)))
            err = String(cString: rel_stress_error(state))
            if !err.isEmpty { return }

            // Bounce: the destination becomes the source; the old source is emptied.
            swap(&src, &dst)
            try empty(dst)
        }
        XCTAssertEqual(backgroundErrors.withLock { $0 }, [])
        XCTAssertEqual(rel_stress_verify(state, src.pointer), 0, String(cString: rel_stress_error(state)))
        let ops = rel_stress_ops(state)
        XCTAssertGreaterThan(ops, 0)
        XCTAssertGreaterThan(totalFaults, 0, "no fault reached the handler")
        XCTAssertGreaterThan(blockingFaults, 0, "no fault reached the blocking-read resolvers")
        XCTAssertGreaterThan(backgroundExisted.load(ordering: .relaxed) + Int(handlerExisted), 0,
                             "the EEXIST path never ran")
        if sharedAlias { XCTAssertGreaterThan(aliasExisted.load(ordering: .relaxed), 0, "no EEXIST through the alias") }
        if wp { XCTAssertGreaterThan(wpFaults, 0, "no write-protect fault") }
        // The batch-16 rounds really batch: with 2 locking threads per CPU faulting at once,
        // some read() returns several queued faults (with batch 1 messages == reads). Asked only
        // where the rounds saw enough faults for a burst to be certain (not the 8-page hugetlb run).
        if batchedReads >= 200 {
            XCTAssertGreaterThan(batchedMessages, batchedReads, "no read() in the batch-16 rounds returned more than one message")
        }
        report("stress kind=\(kind) wp=\(wp) pages=\(npages)x\(ps) rounds=\(profile.rounds) increments=\(ops) "
               + "handlerFaults=\(totalFaults) blockingReadFaults=\(blockingFaults) batch16Reads=\(batchedReads) "
               + "batch16Messages=\(batchedMessages) wpFaults=\(wpFaults) handlerEEXIST=\(handlerExisted) "
               + "backgroundCopied=\(backgroundCopied.load(ordering: .relaxed)) backgroundEEXIST=\(backgroundExisted.load(ordering: .relaxed)) "
               + "aliasEEXIST=\(aliasExisted.load(ordering: .relaxed))")
    }

    /// HugePages_Total/Free/Rsvd/Surp from /proc/meminfo.
    func hugePoolSummary() -> String {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return "no /proc/meminfo" }
        return text.split(separator: "\n").filter { $0.hasPrefix("HugePages_") }
            .map { $0.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ") }
            .joined(separator: ", ")
    }

    /// Drops every page of `r` so that each access faults again (MISSING).
    func empty(_ r: MappedRegion) throws {
        if r.memfd >= 0 {
            // shmem and hugetlb keep pages in the file: punch them out.
            let rc = rel_punch_hole(r.memfd, UInt64(r.length))
            guard rc == 0 else { return XCTFail("fallocate(PUNCH_HOLE): \(String(cString: strerror(-rc)))") }
        }
        if r.kind != .hugetlb { try r.advise(MADV_DONTNEED) }
    }
}
