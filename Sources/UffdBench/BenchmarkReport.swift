// The outcome of a benchmark run, as a text table and as JSON.
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The statistics of one case.
public struct BenchmarkResult: Sendable, Codable {
    /// The case's name ("minimal.copy").
    public var name: String
    /// The table group it is printed under.
    public var group: String
    /// The case this one is divided by; nil for a baseline.
    public var baseline: String?
    /// Where threads ran ("H0 F0").
    public var placement: String
    /// What the row measures.
    public var note: String
    /// Measured runs that produced a sample.
    public var runs: Int
    /// Runs that failed (the first failure's text is in `error`).
    public var failures: Int
    /// Set when the case could not run at all or some runs failed.
    public var error: String?
    /// True when the kernel lacks what the case needs (the row is skipped).
    public var unsupported: Bool
    /// Minimum nanoseconds per 4 KiB page over the runs.
    public var minNsPerPage: Double?
    /// Median nanoseconds per 4 KiB page over the runs.
    public var medianNsPerPage: Double?
    /// Throughput of the median run, GB/s (10^9 bytes per second).
    public var medianGBps: Double?
    /// median / baseline's median (> 1: slower than the baseline).
    public var ratioMedian: Double?
    /// min / baseline's min (> 1: slower than the baseline).
    public var ratioMin: Double?
    /// Medians of the run's extra counters.
    public var counters: [String: Double]
    /// Paired cases: min ns per page of the baseline runs interleaved with this case's runs
    /// (`ratioMin` uses it, not the baseline's own row).
    public var pairedBaselineMinNsPerPage: Double? = nil
    /// Paired cases: median ns per page of the interleaved baseline runs (`ratioMedian` uses it).
    public var pairedBaselineMedianNsPerPage: Double? = nil
    /// Paired cases: the median over run pairs of (this run / the baseline run next to it).
    public var pairedRatioMedian: Double? = nil
    /// The case's limit row (``BenchCase/limit``), nil when it has none.
    public var limit: String? = nil
    /// median / the limit row's median.
    public var limitRatioMedian: Double? = nil
    /// min / the limit row's min.
    public var limitRatioMin: Double? = nil
}

/// The machine a report was measured on.
public struct MachineInfo: Sendable, Codable {
    /// Online CPUs.
    public var cpus: Int
    /// Kernel release (/proc/sys/kernel/osrelease).
    public var kernel: String
    /// "model name" from /proc/cpuinfo.
    public var cpuModel: String
    /// /sys/kernel/mm/transparent_hugepage/enabled.
    public var thp: String
    /// Free page reporting: "order 9" (/sys/module/page_reporting/parameters/page_reporting_order)
    /// when a virtio balloon that negotiated VIRTIO_BALLOON_F_REPORTING is bound, "off" otherwise,
    /// nil in reports from before the field. When on, free memory idle for ~2 s goes back to the
    /// host and costs host faults on its next use (the file and 2 MiB bulk rows prime against it).
    public var pageReporting: String? = nil
}

/// A finished benchmark run.
public struct BenchmarkReport: Sendable, Codable {
    /// Where it ran.
    public var machine: MachineInfo
    /// "quick" or "full".
    public var mode: String
    /// Measured runs per case.
    public var repeats: Int
    /// 4 KiB pages per run of the one-fault-per-page cases.
    public var pages: Int
    /// 4 KiB pages per run of the bulk cases.
    public var bulkPages: Int
    /// To-space pages of the compaction workload.
    public var compactionPages: Int
    /// Bytes of the lazily loaded file.
    public var fileBytes: UInt64
    /// Every case in run order.
    public var results: [BenchmarkResult]

    /// The result of the case named `name`.
    public func result(_ name: String) -> BenchmarkResult? { results.first { $0.name == name } }

    /// A fixed-width table, one line per case, grouped.
    public var table: String {
        var out = "UffdKit benchmarks (\(mode), \(repeats) runs each; ns per 4 KiB page; x base = median / baseline's median, x min = min / baseline's min)\n"
        out += "(interleaved) rows: the baseline ran before each run of the row (B A B A ...) and the ratios use those baseline runs\n"
        out += "limit m / n x row: median / that row's median, min / its min (the physical limit of what the row does; not interleaved)\n"
        out += "machine: \(machine.cpus) CPUs, \(machine.cpuModel), kernel \(machine.kernel), THP \(machine.thp)"
        out += machine.pageReporting.map { ", page reporting \($0)" } ?? ""
        out += "\n"
        out += "sizes: \(pages) pages per-fault, \(bulkPages) pages bulk, \(compactionPages) to-space pages, file \(fileBytes >> 20) MiB\n"
        let header = [pad("case", 46), pad("place", 12), lpad("min", 9), lpad("median", 9), lpad("GB/s", 7),
                      lpad("x base", 7), lpad("x min", 7), "  baseline"].joined()
        var group = ""
        for r in results {
            if r.group != group {
                group = r.group
                out += "\n[\(group)]\n" + header + "\n"
            }
            var line = pad(r.name, 46) + pad(r.placement, 12)
            if let mn = r.minNsPerPage, let md = r.medianNsPerPage {
                line += lpad(fmt(mn), 9) + lpad(fmt(md), 9) + lpad(r.medianGBps.map { fmt($0, 2) } ?? "-", 7)
                line += lpad(r.ratioMedian.map { fmt($0, 2) } ?? "-", 7)
                line += lpad(r.ratioMin.map { fmt($0, 2) } ?? "-", 7)
                line += "  " + (r.baseline ?? "(baseline)")
                if r.pairedBaselineMedianNsPerPage != nil { line += " (interleaved)" }
                if let l = r.limit, let lm = r.limitRatioMedian, let ln = r.limitRatioMin {
                    line += "; limit " + fmt(lm, 2) + " / " + fmt(ln, 2) + " x " + l
                }
                if r.failures > 0 { line += "  [\(r.failures) failed: \(r.error ?? "")]" }
            } else {
                line += "  " + (r.unsupported ? "skipped: " : "FAILED: ") + (r.error ?? "no sample")
            }
            out += line + "\n"
        }
        return out
    }

    /// The report as a JSON document (sorted keys, pretty-printed).
    public var json: String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? enc.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}

private func pad(_ s: String, _ n: Int) -> String {
    s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count)
}

private func lpad(_ s: String, _ n: Int) -> String {
    s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s
}

/// Fixed-point without Foundation's formatters: `digits` decimals, rounded.
func fmt(_ v: Double, _ digits: Int = 0) -> String {
    guard v.isFinite else { return "-" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (abs(v) * scale).rounded()
    let whole = Int(r / scale)
    var s = (v < 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let frac = Int(r - Double(whole) * scale)
        let fs = String(frac)
        s += "." + String(repeating: "0", count: digits - fs.count) + fs
    }
    return s
}
