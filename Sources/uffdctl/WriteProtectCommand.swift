import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl writeprotect`: dirty tracking of a populated region (uffd-wp or WP_ASYNC), with an
/// optional consistent snapshot taken while the writers run.
struct WriteProtectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writeprotect",
        abstract: "Write-protect a populated region, run writers, report the dirty pages (and snapshot it).",
        discussion: """
            Populates the region with the pattern, write-protects it, and lets the writers \
            store a marker into every --every-th page (the others are read). Synchronous mode \
            logs each first write in the handler and unprotects the page; --async uses \
            WP_ASYNC (the kernel resolves the faults) and reads the dirty pages with \
            PAGEMAP_SCAN. The dirty set must equal the pages written, and every byte must match. \
            --snapshot FILE writes the region as it was when protected, while the writers run \
            (copy-before-write in the handler), and checks the file afterwards. \
            Default session: 64 MiB anon, 2 threads, every 4th page written.
            """ + exitCodesHelp
    )

    @OptionGroup var session: SessionOptions

    @Flag(name: .customLong("async"), help: "WP_ASYNC + PAGEMAP_SCAN instead of a fault per first write.")
    var async = false

    @Option(help: ArgumentHelp("Write a consistent snapshot of the region to FILE while the writers run.", valueName: "file"))
    var snapshot: String?

    @Option(help: "Writers write every N-th page (1 = all pages).")
    var every: Int = 4

    func run() throws {
        try session.validateCommon()
        let memory = session.memory
        guard every >= 1 else { throw CLIError.usage("--every must be at least 1 (got \(every))") }
        if async && snapshot != nil {
            throw CLIError.usage("--snapshot needs synchronous tracking (copy-before-write in the handler); drop --async")
        }
        let pageSize = memory.pageSize
        let size = try session.regionSize(pageSize: pageSize, copies: snapshot == nil ? 1 : 2)
        try session.checkHugePages(size)
        var snapshotFD: Int32 = -1
        if let snapshot {
            snapshotFD = open(snapshot, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard snapshotFD >= 0 else { throw CLIError.usage("cannot write the snapshot to \(snapshot): \(errnoName(errno))") }
        }
        defer { if snapshotFD >= 0 { close(snapshotFD) } }

        let pages = size / basePageSize
        let expectedDirty = Set((0..<pages).filter { $0 % every == 0 }.map { $0 * basePageSize / pageSize })
        let saved = snapshot == nil || async ? nil : UnsafeMutableRawPointer.allocate(byteCount: size, alignment: basePageSize)
        defer { saved?.deallocate() }

        var tracker: WriteTrackerPolicy?
        var asyncTracker: AsyncWriteTracker?
        var writer: SnapshotWriter?
        var features: Features = [.pagefaultFlagWP]
        if memory != .anon { features.insert(.wpHugetlbfsShmem) }
        var plan = SessionPlan("writeprotect", options: session, memory: memory, size: size,
                               handling: async ? .kernel : .handler(
                                   features: features, modes: .writeProtect, needed: .writeProtect,
                                   policy: { s in
                                       tracker = WriteTrackerPolicy(region: s.region, snapshot: saved)
                                       return tracker!
                                   }),
                               expected: .pattern(seed: 0x5EED), expectedName: "the pattern and the writers' markers")
        plan.write = true
        plan.actions = (0..<pages).map { $0 % every == 0 ? .write : .read }
        plan.prepare = { fillPattern($0.pointer, offset: 0, count: size) }
        plan.armed = { s in
            do throws(UffdError) {
                if let uffd = s.uffd {
                    try tracker!.arm(uffd)
                } else {
                    asyncTracker = try AsyncWriteTracker(region: s.region)
                }
            } catch {
                throw cliError(error, memory: memory, what: async ? "WP_ASYNC tracking" : "write-protecting the region")
            }
        }
        plan.companions = { s in
            guard snapshotFD >= 0, let tracker else { return [] }
            let w = SnapshotWriter(fd: snapshotFD, region: s.region, policy: tracker)
            writer = w
            return [{ w.write() }]
        }
        plan.finish = { s, notes in
            let dirty: Set<Int>
            if let asyncTracker {
                let ranges: [Range<UInt>]
                do throws(UffdError) {
                    ranges = try asyncTracker.collect(reprotect: false)
                } catch {
                    throw cliError(error, memory: memory, what: "PAGEMAP_SCAN")
                }
                dirty = Set(ranges.flatMap { r in
                    stride(from: r.lowerBound, to: r.upperBound, by: pageSize).map { Int($0 - s.region.address) / pageSize }
                })
            } else {
                dirty = Set(tracker!.dirtyPages())
            }
            notes.details["tracking"] = async ? "async (WP_ASYNC + PAGEMAP_SCAN)" : "sync (write-protect faults)"
            notes.details["dirty_pages"] = .int(dirty.count)
            notes.details["expected_dirty_pages"] = .int(expectedDirty.count)
            notes.details["every"] = .int(every)
            notes.checks.append(.init(key: "dirty_exact", text: "the dirty pages are exactly the pages written",
                                      ok: dirty == expectedDirty))
            notes.lines.append("tracking     \(async ? "WP_ASYNC, dirty pages read with PAGEMAP_SCAN (no handler faults)" : "write-protect faults, page logged then unprotected")")
            notes.lines.append("dirty        \(dirty.count) of \(size / pageSize) pages (expected \(expectedDirty.count): \(dirty == expectedDirty ? "exact" : "MISMATCH"))")
            guard let snapshot, let writer else { return }
            if let e = writer.error { throw CLIError.failed("writing the snapshot: \(e)") }
            let ok = try fileMatchesPattern(fd: snapshotFD, length: size)
            notes.details["snapshot"] = .string(snapshot)
            notes.details["snapshot_verified"] = .bool(ok)
            notes.details["snapshot_pages_from_copy_before_write"] = .int(writer.savedPages)
            notes.checks.append(.init(key: "snapshot_consistent", text: "the snapshot holds the region as it was when protected", ok: ok))
            notes.lines.append("snapshot     \(snapshot): \(formatBytes(size)) written while the writers ran; \(ok ? "every byte matches the region as protected" : "DIFFERS from the region as protected"); \(writer.savedPages) pages came from copy-before-write")
        }
        try SessionRunner.run(plan, options: session).emit(json: session.json)
    }
}

/// Writes the region as it was when protected, while writers run: a page not yet logged
/// dirty after it was read is the original (writes wait for the handler, which logs first);
/// a dirty page comes from the handler's copy-before-write buffer.
final class SnapshotWriter: @unchecked Sendable {
    let fd: Int32
    let region: MappedRegion
    let policy: WriteTrackerPolicy
    private(set) var error: String?
    /// Pages taken from the handler's copy-before-write buffer (written before the snapshot read them).
    private(set) var savedPages = 0

    init(fd: Int32, region: MappedRegion, policy: WriteTrackerPolicy) {
        self.fd = fd
        self.region = region
        self.policy = policy
    }

    func write() {
        let ps = region.pageSize
        let tmp = UnsafeMutableRawPointer.allocate(byteCount: ps, alignment: basePageSize)
        defer { tmp.deallocate() }
        for i in 0..<region.length / ps {
            tmp.copyMemory(from: region.pointer + i * ps, byteCount: ps)
            let dirty = policy.isDirty(page: i)
            if dirty { savedPages += 1 }
            let src: UnsafeRawPointer = dirty ? UnsafeRawPointer(policy.snapshot! + i * ps) : UnsafeRawPointer(tmp)
            var done = 0
            while done < ps {
                let n = pwrite(fd, src + done, ps - done, off_t(i * ps + done))
                if n > 0 { done += n; continue }
                if n < 0 && errno == EINTR { continue }
                error = errnoName(errno)
                return
            }
        }
    }
}

/// Whether the file holds exactly the pattern for `length` bytes.
func fileMatchesPattern(fd: Int32, length: Int) throws(CLIError) -> Bool {
    var st = stat()
    guard fstat(fd, &st) == 0, Int(st.st_size) == length else { return false }
    let chunk = 1 << 20
    let a = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: basePageSize)
    let b = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: basePageSize)
    defer { a.deallocate(); b.deallocate() }
    var off = 0
    while off < length {
        let n = min(chunk, length - off)
        try ExpectedContent.pattern(seed: 0x5EED).fill(a, offset: off, count: n)
        var got = 0
        while got < n {
            let r = pread(fd, b + got, n - got, off_t(off + got))
            if r > 0 { got += r; continue }
            if r < 0 && errno == EINTR { continue }
            return false
        }
        if memcmp(a, b, n) != 0 { return false }
        off += n
    }
    return true
}
