import Foundation
import UffdKit

/// The numbers every session reports, in the JSON's own spelling.
struct SessionSummary: Codable {
    struct FaultsByKind: Codable {
        var missing: UInt64
        var writeProtect: UInt64
        var minor: UInt64
        enum CodingKeys: String, CodingKey {
            case missing, minor
            case writeProtect = "write_protect"
        }
    }
    /// Per-resolution latency in microseconds: the handler's HDR histogram, or the in-thread
    /// resolver's buckets (``InThreadSession/latency(_:)``); zeros without samples.
    struct Latency: Codable {
        var p50: Double
        var p99: Double
        var max: Double
        var samples: UInt64
    }

    var operation: String
    var memory: MemoryType
    var size: Int
    var pageSize: Int
    var threads: Int
    var access: AccessOrder
    var write: Bool
    /// Handler reader threads; 0 when the kernel resolved the faults (no handler, no stats).
    var readers: Int
    var pinnedCPU: Int32?
    var faults: UInt64
    var faultsByKind: FaultsByKind
    var resolutions: [String: UInt64]
    /// The region's bytes (touched by the workload).
    var bytes: Int
    var resolvedBytes: UInt64
    var existed: UInt64
    var fallbacks: UInt64
    var failures: UInt64
    /// Every byte matched, every check held, and the policy resolved every fault.
    var verified: Bool
    var verifiedBytes: Int
    var mismatchedPages: Int
    var skippedPages: Int
    var firstMismatchOffset: Int?
    /// What the region was compared with.
    var expected: String
    var seconds: Double
    var gbps: Double
    var usPerFault: Double
    var faultLatencyUs: Latency
    /// The first failure the handler reported.
    var firstFailure: String?
    /// The operation's extra conditions by key.
    var checks: [String: Bool]?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case operation, memory, size, threads, access, write, readers, faults, resolutions, bytes, existed
        case fallbacks, failures, verified, expected, seconds, gbps, checks
        case pageSize = "page_size", pinnedCPU = "pinned_cpu", faultsByKind = "faults_by_kind"
        case resolvedBytes = "resolved_bytes", verifiedBytes = "verified_bytes"
        case mismatchedPages = "mismatched_pages", skippedPages = "skipped_pages"
        case firstMismatchOffset = "first_mismatch_offset", usPerFault = "us_per_fault"
        case faultLatencyUs = "fault_latency_us", firstFailure = "first_failure"
    }
}

extension SessionSummary {
    init(operation: String, memory: MemoryType, size: Int, pageSize: Int, threads: Int, access: AccessOrder,
         write: Bool, readers: Int, pin: Int32?, seconds: Double, stats: HandlerStats?, verification v: Verification,
         expected: String, firstFailure: String?, checks: [SessionNotes.Check], latency: Latency? = nil) {
        let faults = stats?.faults ?? 0
        func micros(_ p: Double) -> Double {
            guard let s = stats, s.latency.totalCount > 0 else { return 0 }
            return Double(s.latency.valueAtPercentile(p)) / 1000
        }
        self.init(
            operation: operation, memory: memory, size: size, pageSize: pageSize, threads: threads, access: access,
            write: write, readers: readers, pinnedCPU: pin, faults: faults,
            faultsByKind: .init(missing: stats?.missingFaults ?? 0, writeProtect: stats?.writeProtectFaults ?? 0,
                                minor: stats?.minorFaults ?? 0),
            resolutions: Dictionary(uniqueKeysWithValues: (stats?.resolutions ?? [:]).map { ($0.key.description, $0.value) }),
            bytes: size, resolvedBytes: stats?.bytes ?? 0, existed: stats?.existed ?? 0,
            fallbacks: stats?.fallbacks ?? 0, failures: stats?.failures ?? 0,
            verified: v.ok && checks.allSatisfy(\.ok) && (stats?.failures ?? 0) == 0 && (stats?.fallbacks ?? 0) == 0,
            verifiedBytes: v.checkedBytes, mismatchedPages: v.mismatchedPages, skippedPages: v.skippedPages,
            firstMismatchOffset: v.firstMismatch, expected: expected, seconds: seconds,
            gbps: seconds > 0 ? Double(size) / seconds / 1e9 : 0,
            usPerFault: faults > 0 ? seconds * 1e6 / Double(faults) : 0,
            faultLatencyUs: latency ?? .init(p50: micros(50), p99: micros(99),
                                             max: Double(stats?.latency.max ?? 0) / 1000,
                                             samples: stats?.latency.totalCount ?? 0),
            firstFailure: firstFailure,
            checks: checks.isEmpty ? nil : Dictionary(checks.map { ($0.key, $0.ok) }, uniquingKeysWith: { a, b in a && b }))
    }

    /// Every byte of the region matched (the checks and the handler's failures aside).
    var bytesMatched: Bool { mismatchedPages == 0 && verifiedBytes > 0 }
}

/// What a session prints: the common ``SessionSummary`` and the operation's details as one JSON
/// object (details beside the common fields), or the human summary.
@dynamicMemberLookup
struct SessionReport: Codable {
    var summary: SessionSummary
    /// Operation-specific JSON fields, beside the common ones.
    var details: [String: JSONValue] = [:]
    /// Summary lines and check texts (not in the JSON: the checks' outcomes are).
    var notes = SessionNotes()

    subscript<T>(dynamicMember path: KeyPath<SessionSummary, T>) -> T { summary[keyPath: path] }

    init(summary: SessionSummary, details: [String: JSONValue] = [:], notes: SessionNotes = SessionNotes()) {
        self.summary = summary
        self.details = details
        self.notes = notes
    }

    func encode(to encoder: any Encoder) throws {
        try summary.encode(to: encoder)
        var c = encoder.container(keyedBy: JSONKey.self)
        // An unpinned session says so (null) rather than leaving the field out.
        if summary.pinnedCPU == nil { try c.encodeNil(forKey: JSONKey(SessionSummary.CodingKeys.pinnedCPU.rawValue)) }
        for (key, value) in details { try c.encode(value, forKey: JSONKey(key)) }
    }

    init(from decoder: any Decoder) throws {
        summary = try SessionSummary(from: decoder)
        let c = try decoder.container(keyedBy: JSONKey.self)
        let common = Set(SessionSummary.CodingKeys.allCases.map(\.rawValue))
        for key in c.allKeys where !common.contains(key.stringValue) {
            details[key.stringValue] = try c.decode(JSONValue.self, forKey: key)
        }
    }

    /// The JSON object, keys sorted.
    func jsonString() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    func text() -> String {
        let s = summary
        var out = "\(s.operation): \(formatBytes(s.size)) \(s.memory.rawValue) (page \(formatBytes(s.pageSize))), "
        out += "\(s.threads) thread\(s.threads == 1 ? "" : "s"), \(s.access.rawValue) \(s.write ? "write" : "read"), "
        out += "\(s.readers) reader\(s.readers == 1 ? "" : "s")\(s.pinnedCPU.map { ", pinned to CPU \($0)" } ?? "")\n"
        if s.readers > 0 || s.faults > 0 { // faults without readers: resolved in-thread
            let k = s.faultsByKind
            out += "  faults       \(s.faults) (missing \(k.missing), write-protect \(k.writeProtect), minor \(k.minor))\n"
            let order = Resolution.Operation.allCases.map(\.description)
            let ops = s.resolutions.sorted { (order.firstIndex(of: $0.key) ?? .max) < (order.firstIndex(of: $1.key) ?? .max) }
                .map { "\($0.key) \($0.value)" }
            out += "  resolutions  \(ops.isEmpty ? "none" : ops.joined(separator: ", "))"
            if s.existed > 0 { out += " (\(s.existed) already there)" }
            if s.fallbacks + s.failures > 0 { out += " [fallbacks \(s.fallbacks), failures \(s.failures)]" }
            out += "\n  bytes        \(formatBytes(Int(s.resolvedBytes))) resolved for \(formatBytes(s.size)) touched\n"
        }
        out += String(format: "  wall time    %.3f s", s.seconds)
        if s.faults > 0 { out += String(format: " (%.2f µs per fault)", s.usPerFault) }
        out += "\n"
        if s.faultLatencyUs.samples > 0 {
            out += String(format: "  latency      p50 %.2f µs, p99 %.2f µs per resolution (%llu samples)\n",
                          s.faultLatencyUs.p50, s.faultLatencyUs.p99, s.faultLatencyUs.samples)
        }
        out += String(format: "  throughput   %.3f GB/s\n", s.gbps)
        for l in notes.lines { out += "  " + l + "\n" }
        if s.bytesMatched {
            out += "  verified     every byte of \(formatBytes(s.verifiedBytes)) matched \(s.expected)"
            if s.skippedPages > 0 { out += " (\(formatBytes(s.skippedPages * basePageSize)) of poisoned pages not read)" }
            out += "\n"
        } else {
            out += "  verified     NO: \(s.mismatchedPages) of \(s.verifiedBytes / basePageSize) pages differ from \(s.expected)"
            if let f = s.firstMismatchOffset { out += ", first at offset \(f)" }
            out += "\n"
        }
        for c in notes.checks { out += "  check        \(c.ok ? "ok" : "FAILED"): \(c.text)\n" }
        return out
    }

    /// Prints the report (JSON or text); exit 1 when verification or a check failed.
    func emit(json asJSON: Bool) throws {
        print(asJSON ? try jsonString() : text(), terminator: asJSON ? "\n" : "")
        let s = summary
        guard !s.verified else { return }
        var why: [String] = []
        if !s.bytesMatched { why.append("verification failed (\(s.mismatchedPages) pages differ)") }
        for c in notes.checks where !c.ok { why.append(c.text) }
        if s.failures + s.fallbacks > 0 {
            why.append("\(s.fallbacks + s.failures) faults were not resolved by the policy"
                + (s.firstFailure.map { " (first: \($0)" + ")" } ?? ""))
        }
        throw CLIError.failed("\(s.operation): " + why.joined(separator: "; "))
    }
}

/// A key spelled at run time (the details' keys).
struct JSONKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ string: String) { stringValue = string }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

/// Any JSON value: what an operation adds to its report beside the common fields.
enum JSONValue: Codable, Equatable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByFloatLiteral {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(stringLiteral value: String) { self = .string(value) }
    init(integerLiteral value: Int) { self = .int(value) }
    init(booleanLiteral value: Bool) { self = .bool(value) }
    init(floatLiteral value: Double) { self = .double(value) }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .int(let i): try c.encode(i)
        case .double(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let i = try? c.decode(Int.self) { self = .int(i) }
        else if let d = try? c.decode(Double.self) { self = .double(d) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }
}
