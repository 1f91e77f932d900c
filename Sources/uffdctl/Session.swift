import Foundation
import UffdKit

/// Turns a library error into the CLI's exit codes: permissions and missing kernel features
/// are 3 (with the fix), memory the machine cannot map is 2, the rest is 1.
func cliError(_ e: UffdError, memory: MemoryType? = nil, what: String) -> CLIError {
    switch (e.operation, e.errno) {
    case (.open, .notPermitted), (.open, .permissionDenied), (.open, .noFunction):
        return .notAllowed("\(what): \(e)", fix: e.explanation)
    case (.api, .notPermitted):
        return .notAllowed("\(what): the kernel refused the requested features (EPERM): \(e.detail)",
                           fix: "EVENT_FORK needs CAP_SYS_PTRACE: run as root or grant it (e.g. setcap cap_sys_ptrace+ep uffdctl)")
    case (.api, _):
        return .notAllowed("\(what): \(e)", fix: "this kernel lacks the feature; see `uffdctl features` (a newer kernel offers it)")
    case (.map, .noMemory) where memory == .hugetlb, (.map, .invalidArgument) where memory == .hugetlb:
        let total = meminfoValue("HugePages_Total") ?? 0
        return .notAllowed("\(what): cannot map hugetlb memory (\(e.errno))",
                           fix: "reserve huge pages as root: echo \(total + 64) > /proc/sys/vm/nr_hugepages")
    case (.map, .noMemory):
        return .usage("\(what): the machine cannot map this size (\(e.errno)); use a smaller --size")
    case (.map, _), (.argument, _):
        return .usage("\(what): \(e)")
    default:
        return .failed("\(what): \(e)")
    }
}

/// The UffdKit steps every session shares, with the CLI's error mapping.
enum SessionSteps {
    /// Maps `length` bytes of `memory`.
    static func map(_ memory: MemoryType, length: Int, thpAligned: Bool = false) throws(CLIError) -> MappedRegion {
        do {
            let kind: MappedRegion.Kind = memory == .anon ? .anonymous(thpAligned: thpAligned) : memory.kind
            return try MappedRegion(kind, length: length)
        } catch {
            throw cliError(error, memory: memory, what: "mapping \(formatBytes(length)) of \(memory.rawValue) memory")
        }
    }

    /// The features `memory` needs for `mode` faults.
    static func memoryFeatures(_ memory: MemoryType, minor: Bool = false) -> Features {
        switch memory {
        case .anon: return []
        case .shmem, .shmemPrivate: return minor ? .minorShmem : .missingShmem
        case .hugetlb: return minor ? .minorHugetlbfs : .missingHugetlbfs
        }
    }

    /// Opens a userfaultfd with `features`; exit 3 when the kernel or permissions refuse.
    static func open(features: Features) throws(CLIError) -> Userfaultfd {
        let offered: Features
        do {
            offered = try Userfaultfd.probe()
        } catch {
            throw cliError(error, what: "probing userfaultfd")
        }
        let missing = Features(rawValue: features.rawValue & ~offered.rawValue)
        if !missing.isEmpty {
            throw .notAllowed("this kernel does not offer \(missing.names.joined(separator: ", "))",
                              fix: "use a kernel that offers it (see `uffdctl features`)")
        }
        do {
            return try Userfaultfd(features: features)
        } catch {
            throw cliError(error, what: "opening a userfaultfd")
        }
    }

    /// Registers the region and checks that the range offers `needed`.
    static func register(_ uffd: Userfaultfd, _ region: MappedRegion, modes: RegisterMode, needed: Ioctls,
                         memory: MemoryType) throws(CLIError) {
        let ioctls: Ioctls
        do {
            ioctls = try uffd.register(region, modes: modes)
        } catch {
            if error.errno == .invalidArgument {
                throw .notAllowed("registering \(memory.rawValue) memory for \(modes): \(error)",
                                  fix: "this memory type does not support that mode here; try --memory anon or shmem")
            }
            throw cliError(error, memory: memory, what: "registering the region")
        }
        let missing = Ioctls(rawValue: needed.rawValue & ~ioctls.rawValue)
        if !missing.isEmpty {
            throw .notAllowed("the kernel does not offer \(missing.names.joined(separator: ", ")) on \(memory.rawValue) memory (range offers \(ioctls.names.joined(separator: " ")))",
                              fix: "use a memory type that supports it (e.g. --memory anon)")
        }
    }

    /// Starts a handler with `readers` threads.
    static func startHandler(_ uffd: Userfaultfd, policy: any FaultPolicy, readers: Int, pin: Int32? = nil) throws(CLIError) -> FaultHandler {
        var o = FaultHandler.Options()
        o.readers = readers
        o.cpus = pin.map { [Int($0)] }
        // A fault the policy or its ioctl cannot resolve gets a zero page (or is unprotected /
        // continued) instead of SIGBUS: the worker goes on, verification fails, the session
        // reports the failure and exits 1 instead of dying.
        o.fallback = .zeroFill
        o.threadName = "uffdctl-reader"
        let h = FaultHandler(uffd: uffd, policy: policy, options: o)
        do {
            try h.start()
        } catch {
            throw cliError(error, what: "starting the fault handler")
        }
        return h
    }
}

/// What a session prints: the common summary plus operation-specific lines and JSON fields.
struct SessionReport {
    var operation: String
    var memory: MemoryType
    var size: Int
    var pageSize: Int
    var threads: Int
    var access: AccessOrder
    var write: Bool
    var readers: Int
    var pin: Int32? = nil
    var seconds: Double
    var stats: HandlerStats?
    var verification: Verification
    var expectedName: String
    /// Operation-specific JSON fields.
    var extra: [String: Any] = [:]
    /// Operation-specific summary lines.
    var lines: [String] = []
    /// The first failure the handler reported, if any.
    var firstFailure: String?
    /// Extra conditions that must hold for success: JSON key, description, outcome.
    var checks: [(key: String, text: String, ok: Bool)] = []

    var gbps: Double { seconds > 0 ? Double(size) / seconds / 1e9 : 0 }
    var faults: UInt64 { stats?.faults ?? 0 }
    func percentileMicros(_ p: Double) -> Double {
        guard let s = stats, s.latency.totalCount > 0 else { return 0 }
        return Double(s.latency.valueAtPercentile(p)) / 1000
    }
    var microsPerFault: Double { faults > 0 ? seconds * 1e6 / Double(faults) : 0 }
    var ok: Bool {
        verification.ok && checks.allSatisfy(\.ok) && (stats?.failures ?? 0) == 0 && (stats?.fallbacks ?? 0) == 0
    }

    func json() -> [String: Any] {
        var d: [String: Any] = [
            "operation": operation,
            "memory": memory.rawValue,
            "size": size,
            "page_size": pageSize,
            "threads": threads,
            "access": access.rawValue,
            "write": write,
            "readers": readers,
            "pinned_cpu": pin.map { Int($0) as Any } ?? NSNull(),
            "faults": faults,
            "faults_by_kind": [
                "missing": stats?.missingFaults ?? 0,
                "write_protect": stats?.writeProtectFaults ?? 0,
                "minor": stats?.minorFaults ?? 0,
            ],
            "resolutions": Dictionary(uniqueKeysWithValues: (stats?.resolutions ?? [:]).map { ($0.key.description, $0.value) }),
            "bytes": size,
            "resolved_bytes": stats?.bytes ?? 0,
            "existed": stats?.existed ?? 0,
            "fallbacks": stats?.fallbacks ?? 0,
            "failures": stats?.failures ?? 0,
            "verified": ok,
            "verified_bytes": verification.checkedBytes,
            "mismatched_pages": verification.mismatchedPages,
            "skipped_pages": verification.skippedPages,
            "seconds": seconds,
            "gbps": gbps,
            "us_per_fault": microsPerFault,
            "fault_latency_us": ["p50": percentileMicros(50), "p99": percentileMicros(99),
                                 "max": (stats.map { Double($0.latency.max) / 1000 } ?? 0) as Double,
                                 "samples": stats?.latency.totalCount ?? 0],
        ]
        if let f = verification.firstMismatch { d["first_mismatch_offset"] = f }
        if let firstFailure { d["first_failure"] = firstFailure }
        if !checks.isEmpty { d["checks"] = Dictionary(uniqueKeysWithValues: checks.map { ($0.key, $0.ok) }) }
        for (k, v) in extra { d[k] = v }
        return d
    }

    func text() -> String {
        var out = "\(operation): \(formatBytes(size)) \(memory.rawValue) (page \(formatBytes(pageSize))), "
        out += "\(threads) thread\(threads == 1 ? "" : "s"), \(access.rawValue) \(write ? "write" : "read"), \(readers) reader\(readers == 1 ? "" : "s")\(pin.map { ", pinned to CPU \($0)" } ?? "")\n"
        if let s = stats {
            out += "  faults       \(s.faults) (missing \(s.missingFaults), write-protect \(s.writeProtectFaults), minor \(s.minorFaults))\n"
            let ops = s.resolutions.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key) \($0.value)" }
            out += "  resolutions  \(ops.isEmpty ? "none" : ops.joined(separator: ", "))"
            if s.existed > 0 { out += " (\(s.existed) already there)" }
            if s.fallbacks + s.failures > 0 { out += " [fallbacks \(s.fallbacks), failures \(s.failures)]" }
            out += "\n  bytes        \(formatBytes(s.bytes)) resolved for \(formatBytes(size)) touched\n"
        }
        out += String(format: "  wall time    %.3f s", seconds)
        if faults > 0 { out += String(format: " (%.2f µs per fault)", microsPerFault) }
        out += "\n"
        if let s = stats, s.latency.totalCount > 0 {
            out += String(format: "  latency      p50 %.2f µs, p99 %.2f µs per resolution (%llu samples)\n",
                          percentileMicros(50), percentileMicros(99), s.latency.totalCount)
        }
        out += String(format: "  throughput   %.3f GB/s\n", gbps)
        for l in lines { out += "  " + l + "\n" }
        let v = verification
        if v.ok {
            out += "  verified     every byte of \(formatBytes(v.checkedBytes)) matched \(expectedName)"
            if v.skippedPages > 0 { out += " (\(formatBytes(v.skippedPages * basePageSize)) of poisoned pages not read)" }
            out += "\n"
        } else {
            out += "  verified     NO: \(v.mismatchedPages) of \(v.checkedBytes / basePageSize) pages differ from \(expectedName)"
            if let f = v.firstMismatch { out += ", first at offset \(f)" }
            out += "\n"
        }
        for c in checks { out += "  check        \(c.ok ? "ok" : "FAILED"): \(c.text)\n" }
        return out
    }

    /// Prints the report (JSON or text); exit 1 when verification or a check failed.
    func emit(json asJSON: Bool) throws(CLIError) {
        if asJSON {
            printJSON(json())
        } else {
            print(text(), terminator: "")
        }
        if !ok {
            var why: [String] = []
            if !verification.ok { why.append("verification failed (\(verification.mismatchedPages) pages differ)") }
            for c in checks where !c.ok { why.append(c.text) }
            if let s = stats, s.failures + s.fallbacks > 0 {
                why.append("\(s.fallbacks + s.failures) faults were not resolved by the policy"
                    + (firstFailure.map { " (first: \($0))" } ?? ""))
            }
            throw .failed("\(operation): " + why.joined(separator: "; "))
        }
    }
}

/// Prints one JSON object on stdout.
func printJSON(_ object: [String: Any]) {
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys]) else {
        print("{}")
        return
    }
    print(String(decoding: data, as: UTF8.self))
}

/// The actions of a plain workload: every page read or written.
func uniformActions(pages: Int, write: Bool) -> [PageAction] {
    [PageAction](repeating: write ? .write : .read, count: pages)
}
