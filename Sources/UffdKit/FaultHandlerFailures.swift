import CUffd
import Synchronization
import SystemPackage

/// A fault that a policy, a source or an ioctl failed to resolve, delivered to the handler's owner.
public struct HandlerFailure: Sendable, CustomStringConvertible {
    /// The fault (for a deferred fetch: the first fault that waited for it).
    public let fault: Fault
    /// What the policy asked for (`.fail` when it threw; `.deferred` for a fetch that missed
    /// its deadline; `.fail` over the fetch's range for a deferred fetch the source failed).
    public let resolution: Resolution
    /// The error the policy (or the deferred source) threw, if it did.
    public let policyError: (any Error)?
    /// The errno of the failed operation (EIO for a policy failure, ETIMEDOUT for a deadline).
    public let errno: Errno
    /// Whether the fallback resolved the fault (false: the thread was only woken to re-fault).
    public let recoveredByFallback: Bool

    /// One line: the fault, the operation, the error, and what happened.
    public var description: String {
        var s = "fault at \(hex(fault.address)) (\(fault.kind)): \(resolution.operation) failed"
        if let policyError { s += ": policy threw \(policyError)" } else { s += ": \(errno)" }
        return s + (recoveredByFallback ? "; resolved by the fallback" : "; fallback failed, thread woken to re-fault")
    }
}

/// Where readers and deferred completions report failures and forked children; shared by the
/// handler, its readers and its deferred table.
final class HandlerSink: Sendable {
    let options: FaultHandler.Options
    private let log = Mutex<[HandlerFailure]>([])
    private let loopErrs = Mutex<[UffdError]>([])
    private let kids = Mutex<[FaultHandler]>([])
    /// Failure reports readers dropped because the service thread was too far behind.
    let droppedReports = Atomic<Int>(0)

    init(options: FaultHandler.Options) { self.options = options }

    func report(_ f: HandlerFailure) {
        log.withLock { l in
            if l.count >= options.failureLogCapacity, !l.isEmpty { l.removeFirst() }
            if options.failureLogCapacity > 0 { l.append(f) }
        }
        options.onFailure?(f)
    }

    /// Reports a resolution that ended as FALLBACK or FAILED (no-op for other outcomes).
    func report(_ m: uffd_msg, _ r: cuffd_resolution, features: Features, policyError: (any Error)?) {
        let o = r.outcome
        guard o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) else { return }
        let fault = Fault(m, pageMask: ~(UInt(basePageSize) - 1), exact: features.contains(.exactAddress),
                          threadIDs: features.contains(.threadID))
        let resolution = Resolution(Resolution.Operation(rawValue: r.op) ?? .fail, start: UInt(r.dst),
                                    length: Int(r.len), source: UInt(r.src), mode: r.mode)
        report(HandlerFailure(fault: fault, resolution: resolution, policyError: policyError,
                              errno: Errno(rawValue: r.error),
                              recoveredByFallback: o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue)))
    }

    func reportLoop(_ e: UffdError) { loopErrs.withLock { $0.append(e) } }
    func failureLog() -> [HandlerFailure] { log.withLock { $0 } }
    func loopErrorLog() -> [UffdError] { loopErrs.withLock { $0 } }

    func adopt(child: Userfaultfd, policy: any FaultPolicy) {
        guard case .serveWithSamePolicy = options.forkHandling else { return }
        // The child's memory is another address space: the parent's pagemap cannot measure it.
        var o = options
        o.hugePageCoverage = nil
        let h = FaultHandler(uffd: child, policy: policy.forkedChild(), options: o)
        do {
            try h.start()
            kids.withLock { $0.append(h) }
        } catch {
            reportLoop(error)
        }
    }

    func children() -> [FaultHandler] { kids.withLock { $0 } }
    func takeChildren() -> [FaultHandler] { kids.withLock { k in defer { k = [] }; return k } }
}
