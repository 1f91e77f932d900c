import CUffd
import Histogram
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A handler run's table of deferred resolutions (`struct cuffd_deferred`): one entry per range
/// being fetched, finished from any thread. Lives as long as the run or the last
/// ``DeferredFetch`` of it, whichever is later.
final class DeferredTable: @unchecked Sendable {
    let raw: OpaquePointer
    let sink: HandlerSink
    let features: Features
    let deadlineNanos: UInt64
    /// Told of fetches that failed on the source's thread (expiries reach it on the reader).
    let policy: any FaultPolicy
    /// The context those calls get: no reader (index -1), no scratch.
    let failureContext: FaultContext
    /// From claiming a range to finishing it, one sample per finished fetch (finishes run on
    /// any thread: a lock per fetch, never per fault).
    let latency = Mutex(HandlerStats.makeHistogram())

    init(uffd: Int32, options: FaultHandler.Options, features: Features, sink: HandlerSink,
         policy: any FaultPolicy) throws(UffdError) {
        var p: OpaquePointer? = nil
        let rc = cuffd_deferred_create(uffd, UInt32(clamping: options.maxDeferredFetches), options.fallback.rawValue,
                                       features.rawValue, &p)
        guard rc == 0, let p else { throw UffdError(.handler, rc: rc, detail: "deferred resolution table") }
        raw = p
        self.sink = sink
        self.features = features
        self.policy = policy
        failureContext = FaultContext(fd: uffd, features: features, reader: -1, scratchBase: nil, slotSize: 0)
        let (s, atto) = options.deferredDeadline.components
        deadlineNanos = UInt64(clamping: s) &* 1_000_000_000 &+ UInt64(clamping: atto / 1_000_000_000)
    }

    deinit { cuffd_deferred_destroy(raw) }

    /// Stop: wakes every range in flight and refuses their late deliveries.
    func cancel() { _ = cuffd_deferred_cancel(raw) }

    func merge(into s: inout HandlerStats) {
        var d = cuffd_deferred_stats()
        cuffd_deferred_get_stats(raw, &d)
        s.add(d)
        latency.withLock { s.latency.add($0) }
    }

    /// Records a finish; when it ended in the fallback (or worse) tells the policy (as a reader
    /// does for a failure it saw), then the owner.
    func finished(_ m: uffd_msg, _ r: cuffd_resolution, error: (any Error)?) {
        latency.withLock { _ = $0.record(r.end_ns &- r.start_ns) }
        let o = r.outcome
        if o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) {
            let page = UInt(basePageSize)
            let fault = Fault(m, pageMask: ~(page - 1), exact: features.contains(.exactAddress),
                              threadIDs: features.contains(.threadID))
            let resolution = Resolution(Resolution.Operation(rawValue: r.op) ?? .fail, start: UInt(r.dst),
                                        length: Int(r.len), source: UInt(r.src), mode: r.mode)
            policy.failed(fault, resolution: resolution, errno: Errno(rawValue: r.error), context: failureContext)
        }
        sink.report(m, r, features: features, policyError: error)
    }
}

/// What ``FaultContext/deferFill(_:length:pageSize:)`` did with the fault being decided.
public enum Deferral: Sendable {
    /// The range is new: start fetching its bytes and finish the fetch exactly once.
    case fetch(DeferredFetch)
    /// The fault's page is inside a range already being fetched: it waits with that fetch
    /// (single flight); there is nothing to start.
    case joined
}

/// How a deferred fetch ended (`enum cuffd_outcome`, or why nothing was done).
public enum DeferredOutcome: Sendable, Hashable {
    /// The bytes were copied in and every waiting thread woken.
    case resolved
    /// Some page of the range was filled by someone else first (EEXIST): that page was kept,
    /// the rest copied in, every waiter woken; counted in ``HandlerStats/existed``.
    case existed
    /// The range or the process is gone (ENOENT/ESRCH): woken.
    case gone
    /// The fetch failed (or the bytes could not be placed): the handler's fallback resolved it.
    case fallback
    /// The fallback failed too: the threads were woken to re-fault.
    case failed
    /// Too late: the deadline passed and the fallback was applied; nothing was done now.
    case expired
    /// Too late: the handler stopped and woke the range; nothing was done now.
    case cancelled
    /// This fetch was finished before (or is being finished); nothing was done now.
    case alreadyFinished

    init(_ rc: Int32) {
        switch rc {
        case Int32(CUFFD_OUTCOME_RESOLVED.rawValue): self = .resolved
        case Int32(CUFFD_OUTCOME_EXISTED.rawValue): self = .existed
        case Int32(CUFFD_OUTCOME_GONE.rawValue): self = .gone
        case Int32(CUFFD_OUTCOME_FALLBACK.rawValue): self = .fallback
        case -ETIMEDOUT: self = .expired
        case -ECANCELED: self = .cancelled
        case Int32(CUFFD_OUTCOME_FAILED.rawValue): self = .failed
        default: self = .alreadyFinished
        }
    }
}

/// One range being fetched for faults that wait on it. Finish it exactly once, from any thread,
/// with ``deliver(_:)`` or ``fail(_:)``; until then every thread faulting inside the range
/// sleeps (up to the handler's ``FaultHandler/Options/deferredDeadline``).
///
/// Copying it is cheap (a reference and a few words); it keeps the handler run's table alive.
public struct DeferredFetch: Sendable {
    let table: DeferredTable
    let token: UInt64
    /// The start of the range in the registered memory.
    public let address: UInt
    /// The bytes of the range.
    public let length: Int

    /// The range's bytes have arrived: UFFDIO_COPY them in (all `length` of them) and wake every
    /// thread waiting in the range. A buffer of another size is never copied: the fetch fails
    /// (EINVAL) and the fallback applies. Failures are reported to the handler's owner.
    @discardableResult
    public func deliver(_ bytes: UnsafeRawBufferPointer) -> DeferredOutcome {
        guard bytes.count == length, let base = bytes.baseAddress else {
            return fail(UffdError(.argument, .invalidArgument,
                                  detail: "deferred fetch of \(hex(address))+\(length) delivered \(bytes.count) bytes"))
        }
        var m = uffd_msg()
        var r = cuffd_resolution()
        let rc = cuffd_deferred_complete(table.raw, token, UInt64(UInt(bitPattern: base)), &m, &r)
        if rc > 0 { table.finished(m, r, error: nil) }
        return DeferredOutcome(rc)
    }

    /// The fetch failed: the handler's fallback unblocks the range and `error` reaches the
    /// owner (``FaultHandler/failures()``, with errno EIO unless `error` carries one).
    @discardableResult
    public func fail(_ error: any Error) -> DeferredOutcome {
        var e: Int32 = EIO
        if let u = error as? UffdError { e = u.errno.rawValue } else if let x = error as? Errno { e = x.rawValue }
        var m = uffd_msg()
        var r = cuffd_resolution()
        let rc = cuffd_deferred_fail(table.raw, token, e, &m, &r)
        if rc > 0 { table.finished(m, r, error: error) }
        return DeferredOutcome(rc)
    }
}

extension FaultContext {
    /// Leaves the fault being decided waiting for bytes that arrive later: claims
    /// `[start, start+length)` (aligned to `pageSize`, the memory's page size; containing the
    /// fault) in the handler's table of
    /// fetches in flight. Return ``Resolution/deferred`` for the fault afterwards. For
    /// ``Deferral/fetch(_:)`` start the fetch (without blocking this reader thread) and finish
    /// it once; ``Deferral/joined`` means a fetch of the range is already on its way.
    ///
    /// No allocation: a lookup in a small table under its own mutex (held for a few
    /// comparisons, never during an ioctl).
    /// - Throws: ``UffdError`` `.handler`: ENOSPC when ``FaultHandler/Options/maxDeferredFetches``
    ///   ranges are in flight (resolve synchronously, or throw to get the fallback), ESHUTDOWN when
    ///   the handler is stopping, EINVAL for a range that does not contain the fault, ENOTSUP
    ///   outside a handler or with deferral disabled.
    public func deferFill(_ start: UInt, length: Int, pageSize: Int = basePageSize) throws(UffdError) -> Deferral {
        guard let table = deferredTable, let message else {
            throw UffdError(.handler, .notSupported, detail: "deferred resolution needs a FaultHandler with maxDeferredFetches > 0")
        }
        var token: UInt64 = 0
        let deadline = cuffd_now_ns() &+ table.deadlineNanos
        let rc = cuffd_deferred_begin(table.raw, message, UInt64(start), UInt64(length), UInt64(pageSize), deadline, &token)
        switch rc {
        case 1: return .fetch(DeferredFetch(table: table, token: token, address: start, length: length))
        case 0: return .joined
        default: throw UffdError(.handler, rc: rc, detail: "defer \(hex(start))+\(length)")
        }
    }
}
