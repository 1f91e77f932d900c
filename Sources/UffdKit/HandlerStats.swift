import CUffd
import Histogram

/// Counters and the latency histogram of a ``FaultHandler``, merged over its reader threads.
public struct HandlerStats: Sendable, CustomStringConvertible {
    /// read() calls that returned messages.
    public var reads: UInt64 = 0
    /// Messages read (faults and events).
    public var messages: UInt64 = 0
    /// MISSING faults.
    public var missingFaults: UInt64 = 0
    /// Write-protect faults.
    public var writeProtectFaults: UInt64 = 0
    /// MINOR faults.
    public var minorFaults: UInt64 = 0
    /// Fork events.
    public var forkEvents: UInt64 = 0
    /// Remap events.
    public var remapEvents: UInt64 = 0
    /// Remove events.
    public var removeEvents: UInt64 = 0
    /// Unmap events.
    public var unmapEvents: UInt64 = 0
    /// Events of an unknown kind.
    public var otherEvents: UInt64 = 0
    /// Resolutions performed, by operation (`.fail` counts policy failures).
    public var resolutions: [Resolution.Operation: UInt64] = [:]
    /// Bytes resolved.
    public var bytes: UInt64 = 0
    /// Resolutions that found the page already there (EEXIST): woken, counted as done.
    public var existed: UInt64 = 0
    /// Resolutions whose range or process was gone (ENOENT/ESRCH).
    public var gone: UInt64 = 0
    /// EAGAIN with no progress, retried after reading events.
    public var retries: UInt64 = 0
    /// Failures resolved by the fallback.
    public var fallbacks: UInt64 = 0
    /// Failures where the fallback failed too (the thread was woken to re-fault).
    public var failures: UInt64 = 0
    /// Faults resolved while stopping.
    public var stopDrained: UInt64 = 0
    /// Deferred fetches begun (ranges; ``FaultContext/deferFill(_:length:pageSize:)`` returning `.fetch`).
    public var deferredFetches: UInt64 = 0
    /// Faults that joined a fetch already in flight (single flight).
    public var deferredJoined: UInt64 = 0
    /// Deferred fetches delivered and copied in (their bytes count in ``bytes``; EEXIST, gone,
    /// fallback and failure outcomes count in ``existed``, ``gone``, ``fallbacks``, ``failures``).
    public var deferredResolved: UInt64 = 0
    /// Deferred fetches that missed their deadline (the fallback applied).
    public var deferredExpired: UInt64 = 0
    /// Deferred fetches still in flight when the handler stopped (their ranges were woken).
    public var deferredCancelled: UInt64 = 0
    /// Deliveries refused: after the deadline, after a stop, or a second one.
    public var deferredLate: UInt64 = 0
    /// Deferrals refused because ``FaultHandler/Options/maxDeferredFetches`` were in flight.
    public var deferredFull: UInt64 = 0
    /// Deferred fetches in flight when the stats were taken.
    public var deferredInFlight: UInt64 = 0
    /// Nanoseconds from reading a fault's batch to the end of its resolution, one sample per
    /// resolution; for a deferred fetch, from claiming its range to finishing it (one sample
    /// per fetch, however many faults joined it).
    public var latency: Histogram<UInt64> = HandlerStats.makeHistogram()
    /// Huge-page coverage of the memory the handler serves (``FaultHandler/Options/hugePageCoverage``),
    /// measured when the stats were taken; when it could not be measured then (the served process
    /// is gone), the last measurement (see ``hugePageCoverageMeasuredNs``). nil: not asked for,
    /// or never measured.
    public var hugePageCoverage: HugePageCoverage? = nil
    /// When ``hugePageCoverage`` was measured (CLOCK_MONOTONIC nanoseconds, `cuffd_now_ns`).
    public var hugePageCoverageMeasuredNs: UInt64? = nil

    /// Creates empty stats.
    public init() {}

    /// All faults.
    public var faults: UInt64 { missingFaults + writeProtectFaults + minorFaults }

    static func makeHistogram() -> Histogram<UInt64> {
        var h = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 10_000_000_000,
                                  numberOfSignificantValueDigits: .three)
        h.autoResize = true
        return h
    }

    mutating func add(_ s: cuffd_loop_stats) {
        reads += s.reads
        messages += s.messages
        missingFaults += s.faults_missing
        writeProtectFaults += s.faults_wp
        minorFaults += s.faults_minor
        withUnsafeBytes(of: s.events) { raw in
            let ev = raw.bindMemory(to: UInt64.self)
            forkEvents += ev[Int(CUFFD_EVENT_SLOT_FORK.rawValue)]
            remapEvents += ev[Int(CUFFD_EVENT_SLOT_REMAP.rawValue)]
            removeEvents += ev[Int(CUFFD_EVENT_SLOT_REMOVE.rawValue)]
            unmapEvents += ev[Int(CUFFD_EVENT_SLOT_UNMAP.rawValue)]
            otherEvents += ev[Int(CUFFD_EVENT_SLOT_OTHER.rawValue)]
        }
        withUnsafeBytes(of: s.ops) { raw in
            let ops = raw.bindMemory(to: UInt64.self)
            for (i, c) in ops.enumerated() where c != 0 {
                if let op = Resolution.Operation(rawValue: UInt32(i)) { resolutions[op, default: 0] += c }
            }
        }
        bytes += s.bytes
        existed += s.existed
        gone += s.gone
        retries += s.retries
        fallbacks += s.fallbacks
        failures += s.failures
        stopDrained += s.stop_drained
    }

    mutating func add(_ d: cuffd_deferred_stats) {
        deferredFetches += d.fetches
        deferredJoined += d.joined
        deferredResolved += d.resolved
        bytes += d.bytes
        existed += d.existed
        gone += d.gone
        retries += d.retries
        fallbacks += d.fallbacks
        failures += d.failures
        deferredExpired += d.expired
        deferredCancelled += d.cancelled
        deferredLate += d.late
        deferredFull += d.full
        deferredInFlight += d.in_flight
    }

    /// Adds another handler's stats (e.g. a forked child's).
    public mutating func add(_ o: HandlerStats) {
        reads += o.reads; messages += o.messages
        missingFaults += o.missingFaults; writeProtectFaults += o.writeProtectFaults; minorFaults += o.minorFaults
        forkEvents += o.forkEvents; remapEvents += o.remapEvents; removeEvents += o.removeEvents
        unmapEvents += o.unmapEvents; otherEvents += o.otherEvents
        for (k, v) in o.resolutions { resolutions[k, default: 0] += v }
        bytes += o.bytes; existed += o.existed; gone += o.gone; retries += o.retries
        fallbacks += o.fallbacks; failures += o.failures; stopDrained += o.stopDrained
        deferredFetches += o.deferredFetches; deferredJoined += o.deferredJoined
        deferredResolved += o.deferredResolved; deferredExpired += o.deferredExpired
        deferredCancelled += o.deferredCancelled; deferredLate += o.deferredLate
        deferredFull += o.deferredFull; deferredInFlight += o.deferredInFlight
        latency.add(o.latency)
        if let c = o.hugePageCoverage {
            hugePageCoverage = hugePageCoverage.map { $0 + c } ?? c
            hugePageCoverageMeasuredNs = Swift.min(hugePageCoverageMeasuredNs ?? .max, o.hugePageCoverageMeasuredNs ?? .max)
        }
    }

    /// A one-line summary.
    public var description: String {
        let ops = resolutions.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key)=\($0.value)" }
        var s = "faults missing=\(missingFaults) wp=\(writeProtectFaults) minor=\(minorFaults)"
        s += " events fork=\(forkEvents) remap=\(remapEvents) remove=\(removeEvents) unmap=\(unmapEvents)"
        s += " ops[\(ops.joined(separator: " "))] bytes=\(bytes) existed=\(existed) gone=\(gone)"
        s += " retries=\(retries) fallbacks=\(fallbacks) failures=\(failures)"
        if deferredFetches > 0 {
            s += " deferred fetches=\(deferredFetches) joined=\(deferredJoined) resolved=\(deferredResolved)"
            s += " expired=\(deferredExpired) cancelled=\(deferredCancelled) late=\(deferredLate)"
        }
        if let c = hugePageCoverage { s += " huge_page_bytes=\(c.hugePageBytes)/\(c.bytes)" }
        if latency.totalCount > 0 {
            s += " latency p50=\(latency.valueAtPercentile(50))ns p99=\(latency.valueAtPercentile(99))ns"
        }
        return s
    }
}
