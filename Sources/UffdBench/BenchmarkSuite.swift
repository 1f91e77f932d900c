// Runs cases, repeats them, and turns samples into a report with ratios to baselines.
import CUffdBench

#if canImport(Glibc)
import Glibc
#endif

/// A set of cases and the options to run them with.
public struct BenchmarkSuite: Sendable {
    /// How the cases are sized and repeated.
    public var options: BenchmarkOptions
    /// The cases, in run order.
    public var cases: [BenchCase]
    /// Runs after all cases (removes files the cases created).
    public var teardown: [@Sendable () -> Void]

    /// The standard cases for `options` (see `StandardCases.swift`), filtered by `options.filter`.
    public init(options: BenchmarkOptions) {
        self.options = options
        self.cases = BenchmarkSuite.standardCases(options)
        self.teardown = options.fileDirectories.map { dir in { _ = unlink(fileBenchPath(dir)) } }
    }

    /// A suite of exactly `cases`.
    public init(options: BenchmarkOptions, cases: [BenchCase], teardown: [@Sendable () -> Void] = []) {
        self.options = options
        self.cases = cases
        self.teardown = teardown
    }

    /// Adds a case (e.g. a UffdKit-based variant whose baseline is "minimal.copy").
    public mutating func add(_ c: BenchCase) { cases.append(c) }

    /// The cases `options.filter` keeps, plus the baselines and limit rows they need.
    public var selectedCases: [BenchCase] {
        guard !options.filter.isEmpty else { return cases }
        var keep = Set(cases.filter { c in options.filter.contains { c.name.contains($0) } }.map(\.name))
        var grew = true
        while grew {
            grew = false
            for c in cases where keep.contains(c.name) {
                if let b = c.baseline, !keep.contains(b) { keep.insert(b); grew = true }
                if let l = c.limit, !keep.contains(l) { keep.insert(l); grew = true }
            }
        }
        return cases.filter { keep.contains($0.name) }
    }

    /// Runs every selected case `effectiveRepeats` times (after a warm-up when asked) and
    /// builds the report. `progress` sees each case name before it runs.
    public func run(progress: ((String) -> Void)? = nil) -> BenchmarkReport {
        var results: [BenchmarkResult] = []
        var samples: [String: [BenchSample]] = [:]
        for c in selectedCases {
            progress?(c.name)
            var r = BenchmarkResult(name: c.name, group: c.group, baseline: c.baseline, placement: c.placement,
                                    note: c.note, runs: 0, failures: 0, error: nil, unsupported: false,
                                    counters: [:])
            r.limit = c.limit
            if let failure = c.prepare?() {
                r.error = failure.description
                r.unsupported = failure.unsupported
                results.append(r)
                continue
            }
            var got: [BenchSample] = []
            // Paired: the baseline runs right before each run of this case.
            let partner = c.paired ? c.baseline.flatMap { b in cases.first { $0.name == b } } : nil
            var partnerGot: [BenchSample] = []
            var pairRatios: [Double] = []
            let total = max(c.repeats ?? 0, options.effectiveRepeats) + (options.warmup ? 1 : 0)
            for i in 0..<total {
                var partnerSample: BenchSample? = nil
                if let partner, case .success(let s) = partner.run() { partnerSample = s }
                switch c.run() {
                case .success(let s):
                    if !(options.warmup && i == 0) {
                        got.append(s)
                        if let ps = partnerSample {
                            partnerGot.append(ps)
                            pairRatios.append(perPage(s) / max(perPage(ps), 1e-9))
                        }
                    }
                case .failure(let f):
                    if f.unsupported {
                        r.unsupported = true
                        r.error = f.description
                    } else {
                        r.failures += 1
                        if r.error == nil { r.error = f.description }
                    }
                }
                if r.unsupported { break }
            }
            r.runs = got.count
            if !got.isEmpty {
                let perPage = got.map { Double($0.ns) / Double(max($0.pages, 1)) }.sorted()
                r.minNsPerPage = perPage.first
                r.medianNsPerPage = median(perPage)
                let byNs = got.sorted { Double($0.ns) / Double(max($0.pages, 1)) < Double($1.ns) / Double(max($1.pages, 1)) }
                let mid = byNs[byNs.count / 2]
                r.medianGBps = mid.ns > 0 ? Double(mid.bytes) / Double(mid.ns) : nil
                var keys = Set<String>()
                for s in got { keys.formUnion(s.counters.keys) }
                for k in keys { r.counters[k] = median(got.compactMap { $0.counters[k] }.sorted()) }
            }
            if partner != nil, !partnerGot.isEmpty {
                let pp = partnerGot.map(perPage).sorted()
                r.pairedBaselineMinNsPerPage = pp.first
                r.pairedBaselineMedianNsPerPage = median(pp)
                r.pairedRatioMedian = median(pairRatios.sorted())
            }
            samples[c.name] = got
            results.append(r)
        }
        for t in teardown { t() }
        // Ratios once everything ran, so a baseline may come after the case that uses it.
        for i in results.indices {
            guard let b = results[i].baseline, let base = results.first(where: { $0.name == b }) else { continue }
            let baseMedian = results[i].pairedBaselineMedianNsPerPage ?? base.medianNsPerPage
            let baseMin = results[i].pairedBaselineMinNsPerPage ?? base.minNsPerPage
            if let m = results[i].medianNsPerPage, let bm = baseMedian, bm > 0 { results[i].ratioMedian = m / bm }
            if let m = results[i].minNsPerPage, let bm = baseMin, bm > 0 { results[i].ratioMin = m / bm }
        }
        for i in results.indices {
            guard let l = results[i].limit, let lim = results.first(where: { $0.name == l }) else { continue }
            if let m = results[i].medianNsPerPage, let lm = lim.medianNsPerPage, lm > 0 { results[i].limitRatioMedian = m / lm }
            if let m = results[i].minNsPerPage, let lm = lim.minNsPerPage, lm > 0 { results[i].limitRatioMin = m / lm }
        }
        return BenchmarkReport(machine: MachineInfo.current, mode: options.full ? "full" : "quick",
                               repeats: options.effectiveRepeats, pages: options.effectivePages,
                               bulkPages: options.effectiveBulkPages, compactionPages: options.effectiveCompactionPages,
                               fileBytes: options.effectiveFileBytes, results: results)
    }
}

/// Runs the standard suite with `options` and returns its report (`report.table`, `report.json`).
/// `progress` (optional) sees each case name before it runs, e.g. to print it to stderr.
public func runBenchmarks(_ options: BenchmarkOptions, progress: ((String) -> Void)? = nil) -> BenchmarkReport {
    BenchmarkSuite(options: options).run(progress: progress)
}

private func perPage(_ s: BenchSample) -> Double { Double(s.ns) / Double(max(s.pages, 1)) }

private func median(_ sorted: [Double]) -> Double? {
    guard !sorted.isEmpty else { return nil }
    let n = sorted.count
    return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
}

extension MachineInfo {
    /// This machine: online CPUs, kernel release, CPU model, THP mode.
    public static var current: MachineInfo {
        let kernel = readText("/proc/sys/kernel/osrelease").trimmedLine
        let model = readText("/proc/cpuinfo").split(separator: "\n")
            .first { $0.hasPrefix("model name") }
            .flatMap { $0.split(separator: ":", maxSplits: 1).last }
            .map { String($0).trimmedLine } ?? "unknown"
        let thp = readText("/sys/kernel/mm/transparent_hugepage/enabled").trimmedLine
        return MachineInfo(cpus: Int(cubench_ncpus()), kernel: kernel, cpuModel: model, thp: thp,
                           pageReporting: pageReportingState())
    }

    /// "order N" when a bound virtio balloon negotiated VIRTIO_BALLOON_F_REPORTING (feature bit 5)
    /// and the page_reporting module parameter is there; "off" otherwise.
    static func pageReportingState() -> String {
        let order = readText("/sys/module/page_reporting/parameters/page_reporting_order").trimmedLine
        guard !order.isEmpty else { return "off" }
        for i in 0..<64 {
            let dev = "/sys/bus/virtio/devices/virtio\(i)"
            let id = readText(dev + "/device").trimmedLine
            if id.isEmpty && access(dev, F_OK) != 0 { break }
            // virtio device id 5: the memory balloon; "features" is one '0'/'1' per bit.
            guard id == "0x0005", access(dev + "/driver", F_OK) == 0 else { continue }
            let features = Array(readText(dev + "/features").utf8)
            if features.count > 5, features[5] == UInt8(ascii: "1") { return "order \(order)" }
        }
        return "off"
    }
}

private extension String {
    var trimmedLine: String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" || f == "\n" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" || l == "\n" { s = s.dropLast() }
        return String(s)
    }
}

/// A small text file (procfs, sysfs) read with plain syscalls; "" when unreadable.
func readText(_ path: String) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while bytes.count < 1 << 20 {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) }
        if n <= 0 { break }
        bytes.append(contentsOf: buf[0..<n])
    }
    return String(decoding: bytes, as: UTF8.self)
}
