// In-thread resolution rows (UFFD_FEATURE_SIGBUS): the faulting thread resolves its own fault
// in a SIGBUS handler, against the handler round trips of the same run.
import CUffd
import CUffdBench

/// Runs one in-thread kernel: `plain` is the hand-written SIGBUS + ioctl handler, otherwise
/// the project's cuffd_sigbus_* resolver.
public func runInThreadKernel(zeropage: Bool, plain: Bool, pages: Int, faultCPU: Int32,
                              latency: Bool = false) -> Result<BenchSample, BenchFailure> {
    var p = cubench_sigbus_params()
    p.range_flags = latency ? UInt32(CUFFD_SIGBUS_LATENCY.rawValue) : 0
    p.pages = UInt64(pages)
    p.op = zeropage ? UInt32(CUBENCH_SIGBUS_ZEROPAGE.rawValue) : UInt32(CUBENCH_SIGBUS_COPY.rawValue)
    p.resolver = plain ? UInt32(CUBENCH_SIGBUS_PLAIN.rawValue) : UInt32(CUBENCH_SIGBUS_CUFFD.rawValue)
    p.fault_cpu = faultCPU
    p.timeout_ms = 30000
    var r = cubench_result()
    let rc = cubench_sigbus(&p, &r)
    guard rc == 0 else {
        return .failure(BenchFailure(errno: -rc, operation: "cubench_sigbus(\(zeropage ? "zeropage" : "copy"), \(plain ? "plain" : "cuffd"))"))
    }
    return .success(BenchSample(ns: r.ns, pages: r.pages, bytes: r.bytes, counters: ["faults": Double(r.faults)]))
}

extension BenchmarkSuite {
    /// `inthread.*`: per 4 KiB fault, the plain C SIGBUS resolver and cuffd_sigbus, each against
    /// the minimal C handler on the same CPU; cuffd_sigbus also against the handler on the other
    /// CPU and against the plain resolver (issue 13's targets: <= 0.7x, <= 0.2x, <= 1.05x).
    static func inThreadCases(_ o: BenchmarkOptions) -> [BenchCase] {
        let n = o.effectivePages
        let ncpu = Int32(cubench_ncpus())
        let fc = o.faultCPU % ncpu
        let group = "in-thread (UFFD_FEATURE_SIGBUS), 4 KiB per fault"
        var cases: [BenchCase] = []
        for (op, zero) in [("copy", false), ("zeropage", true)] {
            cases.append(BenchCase(name: "inthread.plain-\(op)", group: group, baseline: "minimal.\(op)",
                                   placement: "F\(fc)", note: "plain C: SIGBUS handler, range check + one ioctl",
                                   paired: true) {
                runInThreadKernel(zeropage: zero, plain: true, pages: n, faultCPU: fc)
            })
            cases.append(BenchCase(name: "inthread.\(op)", group: group, baseline: "minimal.\(op)",
                                   placement: "F\(fc)", note: "cuffd_sigbus; x = vs the same-CPU round trip (target <= 0.7)",
                                   paired: true) {
                runInThreadKernel(zeropage: zero, plain: false, pages: n, faultCPU: fc)
            })
            cases.append(BenchCase(name: "inthread.\(op).vs-plain", group: group, baseline: "inthread.plain-\(op)",
                                   placement: "F\(fc)", note: "cuffd_sigbus; x = vs plain C SIGBUS (target <= 1.05)",
                                   paired: true, repeats: 11) {
                runInThreadKernel(zeropage: zero, plain: false, pages: n, faultCPU: fc)
            })
        }
        // The cost of the fault-service latency histogram (two clock reads and a few relaxed
        // atomics per fault): cuffd_sigbus with it against the same range without it.
        for (op, zero) in [("copy", false), ("zeropage", true)] {
            cases.append(BenchCase(name: "inthread.\(op).no-latency", group: group, placement: "F\(fc)",
                                   note: "cuffd_sigbus without CUFFD_SIGBUS_LATENCY (the default: no clock read)") {
                runInThreadKernel(zeropage: zero, plain: false, pages: n, faultCPU: fc, latency: false)
            })
            cases.append(BenchCase(name: "inthread.\(op).vs-no-latency", group: group, baseline: "inthread.\(op).no-latency",
                                   placement: "F\(fc)", note: "cuffd_sigbus; x = latency histogram on vs off (target <= 1.03)",
                                   paired: true, repeats: 11) {
                runInThreadKernel(zeropage: zero, plain: false, pages: n, faultCPU: fc, latency: true)
            })
        }
        cases.append(BenchCase(name: "inthread.copy.vs-cross", group: group, baseline: "place.copy.cross-cpu",
                               placement: "F\(fc)", note: "cuffd_sigbus; x = vs the handler on the other CPU (target <= 0.2)",
                               paired: true) {
            runInThreadKernel(zeropage: false, plain: false, pages: n, faultCPU: fc)
        })
        return cases
    }
}
