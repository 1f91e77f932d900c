import CUffdTestSupport
import Foundation
import XCTest

/// What a run of the built uffdctl produced.
struct CLIResult {
    var code: Int32
    var stdout: String
    var stderr: String

    /// stdout parsed as one JSON object (nil when it is not one).
    var json: [String: Any]? {
        guard let data = stdout.data(using: .utf8) else { return nil }
        return (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
    }
}

/// The uffdctl binary next to the test bundle (the products directory).
func uffdctlURL() throws -> URL {
    var candidates: [URL] = []
    for b in [Bundle.main, Bundle(for: CLIBundleToken.self)] {
        candidates.append(b.bundleURL.deletingLastPathComponent().appendingPathComponent("uffdctl"))
        candidates.append(b.bundleURL.appendingPathComponent("uffdctl"))
        if let e = b.executableURL {
            candidates.append(e.deletingLastPathComponent().appendingPathComponent("uffdctl"))
        }
    }
    candidates.append(URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../.build/debug/uffdctl").standardized)
    for c in candidates where FileManager.default.isExecutableFile(atPath: c.path) { return c }
    throw XCTSkip("uffdctl binary not found next to the test bundle (looked in \(candidates.map(\.path)))")
}

private final class CLIBundleToken {}

/// Runs uffdctl with `arguments`; fails the test (and kills the process) after `timeout` seconds.
func runUffdctl(_ arguments: [String], timeout: TimeInterval = 60, file: StaticString = #filePath,
                line: UInt = #line) throws -> CLIResult {
    let exe = try uffdctlURL()
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let outURL = dir.appendingPathComponent("stdout")
    let errURL = dir.appendingPathComponent("stderr")
    _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
    _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
    let out = try FileHandle(forWritingTo: outURL)
    let err = try FileHandle(forWritingTo: errURL)
    let p = Process()
    p.executableURL = exe
    p.arguments = arguments
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(10_000) }
    if p.isRunning {
        p.terminate()
        usleep(200_000)
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        XCTFail("uffdctl \(arguments.joined(separator: " ")) did not finish within \(timeout) s", file: file, line: line)
    }
    p.waitUntilExit()
    try out.close()
    try err.close()
    let stdout = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
    let stderr = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
    return CLIResult(code: p.terminationStatus, stdout: stdout, stderr: stderr)
}

/// A number from a JSON object (JSONSerialization gives NSNumber / Int / Double).
func number(_ object: [String: Any]?, _ key: String) -> Double? {
    guard let v = object?[key] else { return nil }
    if let n = v as? NSNumber { return n.doubleValue }
    if let d = v as? Double { return d }
    if let i = v as? Int { return Double(i) }
    return nil
}

/// A boolean from a JSON object.
func flag(_ object: [String: Any]?, _ key: String) -> Bool? {
    guard let v = object?[key] else { return nil }
    if let b = v as? Bool { return b }
    return (v as? NSNumber)?.boolValue
}

/// Leases of 2 MiB huge pages from vm.nr_hugepages for tests that serve hugetlb memory (needs
/// root): cuffd_test_hugetlb_reserve adds them beside other test runs' leases, and
/// ``restore()`` gives exactly those back.
final class HugePageReservation {
    private var leases = 0

    /// Leases `extra` huge pages; true when that many unreserved ones are free afterwards.
    func add(_ extra: Int) -> Bool {
        leases += 1
        return cuffd_test_hugetlb_reserve(extra) == 0
    }

    /// Ends every lease ``add(_:)`` took.
    func restore() {
        while leases > 0 {
            cuffd_test_hugetlb_restore()
            leases -= 1
        }
    }
}
