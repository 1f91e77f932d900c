// One row of the benchmark table: a name, the row it is compared with, and what to run.

#if canImport(Glibc)
import Glibc
#endif

/// What one run of a case measured.
public struct BenchSample: Sendable {
    /// Nanoseconds of the measured section.
    public var ns: UInt64
    /// 4 KiB pages the section handled (ns / pages is the per-page cost).
    public var pages: UInt64
    /// Bytes the section made accessible, copied or loaded (bytes / ns is GB/s).
    public var bytes: UInt64
    /// Extra counters of the run (faults, ioctls, handler pages, ...), reported as medians.
    public var counters: [String: Double]

    /// A sample; `bytes` defaults to `pages * 4096`.
    public init(ns: UInt64, pages: UInt64, bytes: UInt64? = nil, counters: [String: Double] = [:]) {
        self.ns = ns
        self.pages = pages
        self.bytes = bytes ?? pages * 4096
        self.counters = counters
    }
}

/// Why a run produced no sample.
public struct BenchFailure: Error, Sendable, CustomStringConvertible {
    /// The errno the kernel (or the kernel's benchmark function) reported.
    public var errno: Int32
    /// What was being done.
    public var operation: String
    /// True when the machine lacks a feature the case needs: the row is skipped, not failed.
    public var unsupported: Bool

    /// A failure of `operation` with `errno`.
    public init(errno: Int32, operation: String) {
        self.errno = errno
        self.operation = operation
        self.unsupported = errno == EOPNOTSUPP || errno == ENOSYS
    }

    /// "operation: errno N (reason)".
    public var description: String {
        let reason = unsupported ? "not supported by this kernel" : String(cString: strerror(errno))
        return "\(operation): errno \(errno) (\(reason))"
    }
}

/// One benchmark case. Add UffdKit-based variants (a Swift policy through FaultHandler) as
/// more cases with the matching minimal-C case as their baseline.
public struct BenchCase: Sendable {
    /// Unique name, dotted by group: "minimal.copy", "loop.copy", "compact.move-recycled".
    public var name: String
    /// The group the table prints it under.
    public var group: String
    /// The case this one is divided by ("x baseline" column), nil for a baseline itself.
    public var baseline: String?
    /// Where threads ran, e.g. "H0 F0" (handler CPU 0, faulting CPU 0).
    public var placement: String
    /// One line on what the row measures.
    public var note: String
    /// Runs before the first run of the case (e.g. creates a file); a failure skips the case.
    public var prepare: (@Sendable () -> BenchFailure?)?
    /// Runs one measurement.
    public var run: @Sendable () -> Result<BenchSample, BenchFailure>
    /// Alternate this case's runs with runs of its baseline (B A B A ...) and take the ratios
    /// from those interleaved baseline runs, so load from other processes on a shared machine
    /// hits both alike. For small ratios (a layer's overhead) measured far apart in time, the
    /// drift of the machine's load is larger than the effect.
    public var paired: Bool = false
    /// Measured runs of this case (and, when paired, of its interleaved baseline); nil: the
    /// suite's ``BenchmarkOptions/effectiveRepeats``. Never fewer than the suite's.
    public var repeats: Int? = nil
    /// A second row to compare with: the physical limit of what this row does (e.g. the bytes
    /// read into fresh memory for a lazy load). The report adds this row's min and median
    /// divided by the limit row's own (not interleaved: it costs no extra runs).
    public var limit: String? = nil

    /// A case. `run` must be bounded and clean up after itself.
    public init(name: String, group: String, baseline: String? = nil, placement: String, note: String,
                prepare: (@Sendable () -> BenchFailure?)? = nil,
                paired: Bool = false, repeats: Int? = nil, limit: String? = nil,
                run: @escaping @Sendable () -> Result<BenchSample, BenchFailure>) {
        self.name = name
        self.group = group
        self.baseline = baseline
        self.placement = placement
        self.note = note
        self.prepare = prepare
        self.paired = paired
        self.repeats = repeats
        self.limit = limit
        self.run = run
    }
}
