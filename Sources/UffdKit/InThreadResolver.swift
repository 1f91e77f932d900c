import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// In-thread fault resolution (UFFD_FEATURE_SIGBUS): a fault in a registered range raises SIGBUS
/// in the faulting thread, whose signal handler (C, `cuffd_sigbus_*`) resolves it with the
/// range's built-in policy and returns — no handler thread, no context switch, no wake-up.
///
/// ```swift
/// let resolver = try InThreadResolver()                  // its own uffd with UFFD_FEATURE_SIGBUS
/// let range = try resolver.add(region, policy: .copy(from: source.address))
/// try resolver.install()                                 // sigaction(SIGBUS), chaining to the old one
/// // any thread may touch region now; every fault is resolved in that thread
/// print(resolver.stats(range))
/// try resolver.uninstall()
/// ```
///
/// Policies are C-level (the handler runs in signal context: no Swift, no allocation, no
/// locks): copy from memory laid out like the range, pread from a file, zero pages, MOVE from a
/// donor, CONTINUE, poison. A resolution that fails takes the range's ``Fallback``; a SIGBUS
/// that is not ours (another si_code, an address outside every range, kill(2)) goes to the
/// action installed before, or the default action, as if the resolver were not there.
///
/// **Kernel-mode accesses.** A syscall that reads or writes an unresolved page of a SIGBUS-mode
/// range (read(2) into it, write(2) from it, O_DIRECT, process_vm_readv) gets no signal: it
/// fails with EFAULT (or returns short). Resolve what a syscall will touch first with
/// ``prefault(_:start:length:)``, or touch it from the thread (a user-mode access resolves it),
/// or keep memory handed to syscalls in a second range registered on a fd-mode
/// ``Userfaultfd`` served by a ``FaultHandler`` (its faults then wait for the handler as usual).
///
/// **Rules for the faulting threads.** Do not block SIGBUS in a thread that touches a range (a
/// fault while SIGBUS is blocked kills the process: the kernel forces the default action).
/// After `fork()` the child's copy of the memory is not registered (no EVENT_FORK in SIGBUS
/// mode): it sees the pages resolved before the fork and zeros (anonymous) elsewhere, and its
/// table starts empty.
///
/// The table and the handler are process-wide; several resolvers may exist, each owning its
/// ranges. Not for write-protect ranges: a WP fault in SIGBUS mode would need UNPROTECT, which no
/// built-in policy does (it is delivered after a few attempts).
public final class InThreadResolver: Sendable {
    /// How a range's faults are resolved (`enum cuffd_sigbus_policy`).
    public enum Policy: Sendable {
        /// UFFDIO_COPY from memory laid out like the range: the page at offset `o` comes from
        /// `source + o` (must not itself be an unresolved page of a SIGBUS-mode range: EFAULT).
        case copy(from: UInt)
        /// pread(2) from the file at `offset + o` into a scratch page, then UFFDIO_COPY; bytes
        /// past the end of the file are zeros. The resolver opens `path` and closes it on removal.
        case file(path: String, offset: UInt64 = 0)
        /// As ``file(path:offset:)`` from a descriptor the caller keeps open while the range exists.
        case fileDescriptor(Int32, offset: UInt64 = 0)
        /// UFFDIO_ZEROPAGE (hugetlb: a COPY of zeros).
        case zero
        /// UFFDIO_MOVE of page `o` of the donor (``MappedRegion/donor(length:alignment:hugePages:)``,
        /// populated, at least as long as the range) to page `o`; a page dropped after its move
        /// (the donor page is a hole) is zero-filled.
        case move(donor: MappedRegion)
        /// UFFDIO_CONTINUE (MINOR ranges of shmem/hugetlb; the page cache is filled elsewhere).
        case `continue`
        /// UFFDIO_POISON: this access and every later one raise a SIGBUS delivered as if the
        /// resolver were not there.
        case poison
    }

    /// What happens when a resolution fails (`enum cuffd_sigbus_fallback`). Never a SIGBUS loop:
    /// when the fallback fails too, the signal is delivered.
    public enum Fallback: Int32, Sendable {
        /// Deliver the SIGBUS to the previous action (default: the process dies with SIGBUS).
        case signal = 0
        /// Map zeros and let the thread go on.
        case zeroFill = 1
        /// Poison the page: the access, and every later one, raise SIGBUS (delivered).
        case poison = 2
    }

    /// A range in the process-wide table.
    public struct Range: Sendable, Hashable {
        /// The table slot (`cuffd_sigbus_add`'s id).
        public let id: Int32
        /// The first byte.
        public let start: UInt
        /// Bytes.
        public let length: Int
        /// Tells a range from a later one that reuses its table slot at the same addresses.
        let generation: UInt64
    }

    private static let generations = Atomic<UInt64>(0)

    /// Counters and fault-service latency of one range (`struct cuffd_sigbus_stats`).
    public struct Stats: Sendable, Equatable {
        /// SIGBUS taken in the range (every attempt).
        public var signals: UInt64
        /// Resolutions the policy's op completed.
        public var resolved: UInt64
        /// EEXIST: another thread resolved the page first.
        public var existed: UInt64
        /// ENOENT/ESRCH: the range was gone (unregistered, unmapped); the access was retried.
        public var gone: UInt64
        /// EAGAIN retries in the handler.
        public var retries: UInt64
        /// Failures the fallback resolved.
        public var fallbacks: UInt64
        /// Failures delivered as SIGBUS to the previous action.
        public var delivered: UInt64
        /// Repeated faults on one page of one thread, delivered instead of looping.
        public var loopBreaks: UInt64
        /// Accesses to pages this range poisoned (delivered).
        public var poisonedHits: UInt64
        /// Bytes mapped.
        public var bytes: UInt64
        /// Ops by kind: COPY, ZEROPAGE, MOVE, CONTINUE, POISON (fallbacks included).
        public var copies, zeropages, moves, continues, poisons: UInt64
        /// The errno of the first failure, nil when none.
        public var firstError: Errno?
        /// Fault-service latency: one sample per SIGBUS the range's policy handled.
        public var latency: Latency

        /// Fault-service latency of a range (`struct cuffd_sigbus_latency`): CLOCK_MONOTONIC
        /// nanoseconds from the SIGBUS handler's entry to the resolution returning (EAGAIN retries
        /// included), one sample per signal the range's policy handled, whatever its outcome
        /// (resolved, already there, gone, fallback, delivered; not the loop breaks), so
        /// ``count`` is ``Stats/signals`` minus ``Stats/loopBreaks``. The comparable number of a
        /// ``FaultHandler`` is ``HandlerStats/latency`` (there from reading the fault to its
        /// resolution; here there is no queue, no reader and no wake-up).
        ///
        /// Recorded in the signal handler into fixed buckets (no allocation, no lock): exact
        /// below 8 ns, above that 8 linear sub-buckets per power of two. Percentiles are the
        /// upper bound of the bucket holding the sample of that rank, clamped to ``maxNs``: at
        /// or above the exact value by less than 12.5%. ``minNs``, ``maxNs`` and ``sumNs`` are exact.
        public struct Latency: Sendable, Equatable, CustomStringConvertible {
            /// Samples.
            public var count: UInt64
            /// Their sum in nanoseconds.
            public var sumNs: UInt64
            /// The smallest sample (0 without samples).
            public var minNs: UInt64
            /// The largest sample (0 without samples).
            public var maxNs: UInt64
            /// Samples per bucket, `CUFFD_SIGBUS_LAT_BUCKETS` of them (`cuffd_sigbus_latency_bucket_of`
            /// maps nanoseconds to a bucket, `cuffd_sigbus_latency_bucket_upper` a bucket to its bound).
            public var buckets: [UInt64]

            init(_ l: cuffd_sigbus_latency) {
                count = l.count
                sumNs = l.sum_ns
                minNs = l.min_ns
                maxNs = l.max_ns
                buckets = withUnsafeBytes(of: l.buckets) { Array($0.bindMemory(to: UInt64.self)) }
            }

            /// The `p`-th percentile in nanoseconds (`cuffd_sigbus_latency_percentile`; 0 < p <= 100):
            /// a bucket upper bound (12.5% precision) clamped to ``maxNs``; 0 without samples.
            public func percentile(_ p: Double) -> UInt64 {
                var l = cuffd_sigbus_latency()
                l.count = count
                l.sum_ns = sumNs
                l.min_ns = minNs
                l.max_ns = maxNs
                withUnsafeMutableBytes(of: &l.buckets) { raw in
                    let b = raw.bindMemory(to: UInt64.self)
                    for i in 0..<Swift.min(b.count, buckets.count) { b[i] = buckets[i] }
                }
                return cuffd_sigbus_latency_percentile(&l, p)
            }

            /// The median (nanoseconds, a bucket upper bound).
            public var p50: UInt64 { percentile(50) }
            /// The 90th percentile (nanoseconds, a bucket upper bound).
            public var p90: UInt64 { percentile(90) }
            /// The 99th percentile (nanoseconds, a bucket upper bound).
            public var p99: UInt64 { percentile(99) }
            /// The mean in nanoseconds (exact), 0 without samples.
            public var meanNs: Double { count > 0 ? Double(sumNs) / Double(count) : 0 }

            public var description: String {
                count == 0 ? "no samples"
                    : "p50=\(p50)ns p90=\(p90)ns p99=\(p99)ns max=\(maxNs)ns (\(count) samples)"
            }
        }

        init(_ s: cuffd_sigbus_stats) {
            signals = s.signals
            resolved = s.resolved
            existed = s.existed
            gone = s.gone
            retries = s.retries
            fallbacks = s.fallbacks
            delivered = s.delivered
            loopBreaks = s.loop_breaks
            poisonedHits = s.poisoned_hits
            bytes = s.bytes
            let ops = withUnsafeBytes(of: s.ops) { Array($0.bindMemory(to: UInt64.self)) }
            copies = ops[Int(CUFFD_OP_COPY.rawValue)]
            zeropages = ops[Int(CUFFD_OP_ZEROPAGE.rawValue)]
            moves = ops[Int(CUFFD_OP_MOVE.rawValue)]
            continues = ops[Int(CUFFD_OP_CONTINUE.rawValue)]
            poisons = ops[Int(CUFFD_OP_POISON.rawValue)]
            firstError = s.first_error == 0 ? nil : Errno(rawValue: s.first_error)
            latency = Latency(s.latency)
        }
    }

    /// Process-wide counters (`struct cuffd_sigbus_global_stats`).
    public struct GlobalStats: Sendable, Equatable {
        /// Every SIGBUS the handler saw.
        public var signals: UInt64
        /// SIGBUS that were not ours, passed on.
        public var chained: UInt64
        /// SIGBUS raised in a range just before its removal: the access was retried.
        public var retired: UInt64
    }

    private struct Entry {
        let range: Range
        let registered: Bool
        let ownedFD: Int32
        let keepAlive: MappedRegion?
    }

    /// The SIGBUS-mode userfaultfd the ranges are registered on.
    public let uffd: Userfaultfd
    private let entries = Mutex<[Int32: Entry]>([:])

    /// Uses `uffd`, which must have ``Features/sigbus`` enabled and no event feature.
    /// - Throws: ``UffdError`` `.argument` when it has not, or has events: a fork, mremap or
    ///   MADV_DONTNEED would wait for a reader of the event, and in SIGBUS mode there is none.
    public init(uffd: Userfaultfd) throws(UffdError) {
        guard uffd.features.contains(.sigbus) else {
            throw UffdError(.argument, .invalidArgument,
                            detail: "InThreadResolver needs a Userfaultfd opened with features: [.sigbus]")
        }
        let events = uffd.features.intersection(.allEvents)
        guard events.isEmpty else {
            throw UffdError(.argument, .invalidArgument,
                            detail: "InThreadResolver cannot serve events \(events): nobody reads them in SIGBUS mode "
                                + "(a fork, mremap or MADV_DONTNEED would wait forever); open the fd without them")
        }
        self.uffd = uffd
    }

    /// Opens its own userfaultfd with ``Features/sigbus`` plus `features` (e.g. ``Features/move``,
    /// ``Features/poison``, ``Features/missingShmem``, ``Features/minorShmem``).
    /// - Throws: ``UffdError`` `.open` / `.api` (the kernel lacks a feature).
    public convenience init(features: Features = [], options: Userfaultfd.Options = .default) throws(UffdError) {
        try self.init(uffd: Userfaultfd(features: features.union(.sigbus), options: options))
    }

    deinit {
        for e in entries.withLock({ Array($0.values) }) { release(e) }
    }

    /// Adds `[start, start+length)` with `policy`. With `register` (the default) the range is
    /// registered on ``uffd`` for `modes` first (and unregistered on removal); otherwise it must be
    /// registered already. `pageSize` is the unit of one resolution (the huge page size of a
    /// hugetlb range). Faults are resolved once ``install()`` ran. With `recordLatency`
    /// (`CUFFD_SIGBUS_LATENCY`) ``Stats/latency`` holds the range's fault-service latency, at two
    /// clock reads per fault (1-2% of an in-thread fault); without it the handler reads no clock
    /// for the range's faults and the latency stays empty.
    /// - Throws: ``UffdError`` `.register`, or `.argument` (misaligned, overlapping an existing
    ///   range: EEXIST, table full: ENOSPC), `.source` (the file cannot be opened).
    public func add(_ start: UInt, length: Int, policy: Policy, fallback: Fallback = .signal,
                    modes: RegisterMode = .missing, pageSize: Int = basePageSize, register: Bool = true,
                    scratchPages: Int = 8, recordLatency: Bool = false) throws(UffdError) -> Range {
        var r = cuffd_sigbus_range()
        r.start = UInt64(start)
        r.len = UInt64(length)
        r.page_size = UInt64(pageSize)
        r.uffd = uffd.fd
        r.fallback = fallback.rawValue
        r.file_fd = -1
        r.scratch_pages = UInt32(max(1, min(64, scratchPages)))
        r.flags = recordLatency ? UInt32(CUFFD_SIGBUS_LATENCY.rawValue) : 0
        var ownedFD: Int32 = -1
        var keep: MappedRegion?
        switch policy {
        case .copy(let src):
            r.policy = UInt32(CUFFD_SIGBUS_COPY.rawValue)
            r.src = UInt64(src)
        case .file(let path, let offset):
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "cannot open \(path)") }
            ownedFD = fd
            r.policy = UInt32(CUFFD_SIGBUS_FILE.rawValue)
            r.file_fd = fd
            r.file_offset = offset
        case .fileDescriptor(let fd, let offset):
            r.policy = UInt32(CUFFD_SIGBUS_FILE.rawValue)
            r.file_fd = fd
            r.file_offset = offset
        case .zero:
            r.policy = UInt32(CUFFD_SIGBUS_ZEROPAGE.rawValue)
        case .move(let donor):
            guard donor.length >= length else {
                throw UffdError(.argument, .invalidArgument, detail: "the donor (\(donor.length) bytes) is shorter than the range (\(length))")
            }
            r.policy = UInt32(CUFFD_SIGBUS_MOVE.rawValue)
            r.src = UInt64(donor.address)
            keep = donor
        case .continue:
            r.policy = UInt32(CUFFD_SIGBUS_CONTINUE.rawValue)
        case .poison:
            r.policy = UInt32(CUFFD_SIGBUS_POISON.rawValue)
        }
        if register {
            do {
                _ = try uffd.register(start, length: length, modes: modes)
            } catch {
                if ownedFD >= 0 { Glibc.close(ownedFD) }
                throw error
            }
        }
        let id = cuffd_sigbus_add(&r)
        guard id >= 0 else {
            if register { try? uffd.unregister(start, length: length) }
            if ownedFD >= 0 { Glibc.close(ownedFD) }
            let what = id == -EEXIST ? "overlaps a range already in the in-thread table"
                : id == -ENOSPC ? "the in-thread table is full (\(CUFFD_SIGBUS_MAX_RANGES) ranges)"
                : "start, length and page size must be page-aligned (page \(pageSize))"
            throw UffdError(.argument, rc: id, detail: "in-thread range 0x\(String(start, radix: 16))+\(length): \(what)")
        }
        let range = Range(id: id, start: start, length: length,
                          generation: InThreadResolver.generations.add(1, ordering: .relaxed).newValue)
        entries.withLock { $0[id] = Entry(range: range, registered: register, ownedFD: ownedFD, keepAlive: keep) }
        return range
    }

    /// Adds a whole region (registered for `modes`; hugetlb regions resolve a huge page per fault).
    public func add(_ region: MappedRegion, policy: Policy, fallback: Fallback = .signal,
                    modes: RegisterMode = .missing, recordLatency: Bool = false) throws(UffdError) -> Range {
        try add(region.address, length: region.length, policy: policy, fallback: fallback, modes: modes,
                pageSize: region.pageSize, recordLatency: recordLatency)
    }

    private func release(_ e: Entry) {
        // Unregister first: a fault from now on is an ordinary one; a signal raised just before
        // finds the range's tombstone and retries the access. Then wait out handlers in flight.
        if e.registered { try? uffd.unregister(e.range.start, length: e.range.length) }
        _ = cuffd_sigbus_remove(e.range.id)
        if e.ownedFD >= 0 { Glibc.close(e.ownedFD) }
    }

    /// Removes a range: unregisters it (when ``add(_:length:policy:fallback:modes:pageSize:register:scratchPages:recordLatency:)``
    /// registered it) and returns once no handler uses it. Later faults there are ordinary
    /// faults of unregistered memory. Idempotent.
    public func remove(_ range: Range) {
        // Table ids are reused after a removal: only the range itself is removed.
        guard let e = entries.withLock({ d in d[range.id]?.range == range ? d.removeValue(forKey: range.id) : nil })
        else { return }
        release(e)
    }

    /// The ranges this resolver owns.
    public var ranges: [Range] { entries.withLock { $0.values.map(\.range).sorted { $0.start < $1.start } } }

    /// Installs the process-wide SIGBUS handler (idempotent), remembering the action it replaces.
    /// - Throws: ``UffdError`` `.handler` when sigaction fails.
    public func install() throws(UffdError) {
        let rc = cuffd_sigbus_install()
        guard rc == 0 else { throw UffdError(.handler, rc: rc, detail: "sigaction(SIGBUS)") }
    }

    /// Removes this resolver's ranges, then stops the process-wide handler from resolving when no
    /// other resolver has ranges (it stays installed as a pass-through to the previous action,
    /// so a signal raised just before cannot reach an old action that does not expect it). With
    /// `restoringPreviousHandler` the previous action is put back with sigaction too — only safe
    /// once every thread that faulted on a range is done. Returns whether the handler stopped.
    @discardableResult
    public func uninstall(restoringPreviousHandler: Bool = false) -> Bool {
        for e in entries.withLock({ d -> [Entry] in
            let all = Array(d.values)
            d.removeAll()
            return all
        }) { release(e) }
        return cuffd_sigbus_uninstall(restoringPreviousHandler) == 0
    }

    /// Whether the process-wide handler is installed and resolving.
    public static var isInstalled: Bool { cuffd_sigbus_installed() }

    /// The range's counters and latency (`cuffd_sigbus_range_stats`).
    public func stats(_ range: Range) -> Stats {
        var s = cuffd_sigbus_stats()
        _ = cuffd_sigbus_range_stats(range.id, &s)
        return Stats(s)
    }

    /// The process-wide counters.
    public static var globalStats: GlobalStats {
        var g = cuffd_sigbus_global_stats()
        cuffd_sigbus_global(&g)
        return GlobalStats(signals: g.signals, chained: g.chained, retired: g.retired)
    }

    /// Resolves `[start, start+length)` of `range` now, through its policy, from this (ordinary)
    /// context: for memory a syscall will read or write (which gets EFAULT on unresolved pages
    /// in SIGBUS mode). Pages already there count as done.
    /// - Throws: ``UffdError`` `.argument` (outside the range), or the first page's failure.
    public func prefault(_ range: Range, start: UInt, length: Int) throws(UffdError) {
        let rc = cuffd_sigbus_prefault(range.id, UInt64(start), UInt64(length))
        guard rc == 0 else {
            throw UffdError(rc == -EINVAL ? .argument : .copy, rc: rc,
                            detail: "prefault 0x\(String(start, radix: 16))+\(length) of in-thread range \(range.id)")
        }
    }
}
