import CUffd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How much of some memory is mapped by huge pages: the "AnonHugePages" of a range, for
/// transparent huge pages and hugetlb alike (PAGEMAP_SCAN with PAGE_IS_HUGE, Linux 6.7).
///
/// Counted: present huge mappings (a THP PMD, a hugetlb page). Not counted: the huge zero
/// page a THP read fault maps (it holds no memory of the range), and hugetlb entries without
/// a page (on 6.18 an untouched or removed hugetlb page still reports PAGE_IS_HUGE, without
/// PAGE_IS_PRESENT). Memory installed 4 KiB at a time (UFFDIO_COPY into anonymous memory)
/// measures 0 until khugepaged collapses it; a hugetlb guest measures every page it touched.
///
/// Cost of one scan (6.18 KVM guest; `HugePageCoverageMeasurement`, UFFDKIT_MEASURE=1, and a C
/// probe): 1 GiB of populated 4 KiB pages 0.5-0.66 ms (4.7 ms the first scan after populating),
/// 1 GiB of THP ~40 µs (512 PMDs), 1 GiB never touched 4-10 µs.
public struct HugePageCoverage: Sendable, Hashable, CustomStringConvertible {
    /// Bytes mapped by huge pages.
    public var hugePageBytes: Int
    /// Bytes measured (the ranges' total length): what ``hugePageBytes`` is out of.
    public var bytes: Int

    /// A measurement.
    public init(hugePageBytes: Int, bytes: Int) {
        self.hugePageBytes = hugePageBytes
        self.bytes = bytes
    }

    /// ``hugePageBytes`` / ``bytes`` (0 when nothing was measured).
    public var fraction: Double { bytes > 0 ? Double(hugePageBytes) / Double(bytes) : 0 }

    /// Sums two measurements (of different ranges).
    public static func + (a: HugePageCoverage, b: HugePageCoverage) -> HugePageCoverage {
        HugePageCoverage(hugePageBytes: a.hugePageBytes + b.hugePageBytes, bytes: a.bytes + b.bytes)
    }

    /// `huge=N/M bytes (P%)`.
    public var description: String {
        "huge=\(hugePageBytes)/\(bytes) bytes (" + String(format: "%.1f%%", fraction * 100) + ")"
    }

    /// Measures `[start, start+length)` of this process (`cuffd_huge_bytes`).
    /// - Throws: ``UffdError`` `.pagemapScan` (EINVAL/ENOTTY: no PAGEMAP_SCAN on this kernel).
    public static func measure(start: UInt, length: Int) throws(UffdError) -> HugePageCoverage {
        try ProcessPagemap(pid: 0).measure(start: start, length: length)
    }

    /// Measures `[start, start+length)` of process `pid` (`cuffd_pagemap_open_pid`,
    /// `cuffd_huge_bytes_fd`). Needs ptrace read access to it (root, or the same user).
    /// - Throws: ``UffdError`` `.pagemapScan`: ESRCH when the process is gone (or never was),
    ///   EACCES/EPERM without access to it.
    public static func measure(pid: Int32, start: UInt, length: Int) throws(UffdError) -> HugePageCoverage {
        try ProcessPagemap(pid: pid).measure(start: start, length: length)
    }
}

/// An open `/proc/PID/pagemap` (`cuffd_pagemap_open_pid`): measures one process's huge-page
/// coverage as often as asked without reopening. It keeps measuring the address space it was
/// opened on: once that process exits, measuring throws ESRCH (a later process that reuses
/// the pid is never measured instead). The fd is closed on deinit.
public final class ProcessPagemap: Sendable {
    /// The process measured (0: this process).
    public let pid: Int32
    private let fd: Int32

    /// Opens the pagemap of `pid` (0: this process).
    /// - Throws: ``UffdError`` `.pagemapScan`: ESRCH when there is no such process,
    ///   EACCES/EPERM without ptrace read access to it.
    public init(pid: Int32 = 0) throws(UffdError) {
        let fd = cuffd_pagemap_open_pid(pid)
        guard fd >= 0 else { throw UffdError(.pagemapScan, rc: fd, detail: "open /proc/\(pid == 0 ? "self" : "\(pid)")/pagemap") }
        self.pid = pid
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    /// Measures `[start, start+length)` of the process (`cuffd_huge_bytes_fd`).
    /// - Throws: ``UffdError`` `.pagemapScan`: ESRCH when the process is gone.
    public func measure(start: UInt, length: Int) throws(UffdError) -> HugePageCoverage {
        let n = cuffd_huge_bytes_fd(fd, UInt64(start), UInt64(length))
        if n < 0 { throw UffdError(.pagemapScan, rc: Int32(n), detail: "huge pages of \(hex(start)) +\(length) of \(pid == 0 ? "this process" : "pid \(pid)")") }
        return HugePageCoverage(hugePageBytes: Int(n), bytes: length)
    }

    /// Measures the ranges where they are now (each ``ServedRange``'s current segments, so a
    /// range that was remapped is measured at its new place; unmapped parts are left out of
    /// both counts).
    public func measure(_ ranges: [ServedRange]) throws(UffdError) -> HugePageCoverage {
        var total = HugePageCoverage(hugePageBytes: 0, bytes: 0)
        for r in ranges {
            for s in r.segments where s.length > 0 { total = total + (try measure(start: s.start, length: s.length)) }
        }
        return total
    }
}

extension HugePageCoverage {
    /// What a ``FaultHandler`` measures at each ``FaultHandler/stats()``
    /// (``FaultHandler/Options/hugePageCoverage``): ranges of one process's memory.
    public struct Target: Sendable {
        /// The process's pagemap (this process's, or a served process's opened at hand-off).
        public var pagemap: ProcessPagemap
        /// The ranges measured (where they are at each measurement).
        public var ranges: [ServedRange]

        /// Ranges of the process `pagemap` was opened on.
        public init(pagemap: ProcessPagemap, ranges: [ServedRange]) {
            self.pagemap = pagemap
            self.ranges = ranges
        }

        /// Ranges of this process.
        /// - Throws: ``UffdError`` `.pagemapScan` when /proc/self/pagemap cannot be opened.
        public init(ranges: [ServedRange]) throws(UffdError) {
            self.init(pagemap: try ProcessPagemap(pid: 0), ranges: ranges)
        }

        /// Measures the ranges now.
        public func measure() throws(UffdError) -> HugePageCoverage { try pagemap.measure(ranges) }
    }
}
