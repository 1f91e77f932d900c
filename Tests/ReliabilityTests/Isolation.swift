import CUffd
import CUffdTestSupport
import Foundation
import XCTest

/// The environment variable that tells a re-executed test binary which test it runs in
/// isolation (its value is the test's specifier).
let isolatedChildVariable = "UFFDKIT_REL_CHILD"

/// Whether the stress tests run their long profile (`make stress`).
let longStress = ProcessInfo.processInfo.environment["UFFDKIT_STRESS"] == "long"

extension XCTestCase {
    /// `ReliabilityTests.Class/testMethod`: what the XCTest binary takes to run one test.
    var testSpecifier: String {
        let method = name.split(whereSeparator: { $0 == "." || $0 == " " || $0 == "[" || $0 == "]" })
            .last.map(String.init) ?? name
        return "ReliabilityTests.\(String(describing: type(of: self)))/\(method)"
    }

    /// Whether this process is the isolated child running this test.
    var isIsolatedChild: Bool {
        ProcessInfo.processInfo.environment[isolatedChildVariable] == testSpecifier
    }

    /// Runs `body` in a separate process: the test binary re-executed for this one test, killed
    /// after `timeout` seconds. A case that can hang (a thread left blocked on a fault) or kill
    /// the process (SIGBUS, SIGSEGV) then fails this test instead of the whole run.
    ///
    /// In the parent: returns the child's output (the body's `report(...)` lines are there);
    /// the child's failures become this test's failures, its skips this test's skip.
    /// In the child: runs `body` and returns "".
    @discardableResult
    func isolated(timeout: Int = 30, asUser: (uid: UInt32, gid: UInt32)? = nil,
                  file: StaticString = #filePath, line: UInt = #line,
                  _ body: () throws -> Void) throws -> String {
        if isIsolatedChild {
            try body()
            return ""
        }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        let spec = testSpecifier
        var out = [CChar](repeating: 0, count: 64 * 1024)
        var code: Int32 = 0
        // As another user: through setpriv (real, effective and saved ids, no groups).
        var args = [exe, spec]
        if let u = asUser {
            args = ["/usr/bin/setpriv", "--reuid=\(u.uid)", "--regid=\(u.gid)", "--clear-groups"] + args
        }
        let cargs = args.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        let rc: Int32 = exe.withCString { _ in
            spec.withCString { _ in
                var argv: [UnsafePointer<CChar>?] = cargs.map { UnsafePointer($0) } + [nil]
                return argv.withUnsafeMutableBufferPointer { a in
                    out.withUnsafeMutableBufferPointer { o in
                        rel_run_child(a.baseAddress, isolatedChildVariable, spec, Int32(timeout * 1000),
                                      o.baseAddress, o.count, &code)
                    }
                }
            }
        }
        let text = out.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
        for l in lines where l.hasPrefix("REL:") { print(l) }
        if rc == -ETIMEDOUT {
            XCTFail("watchdog: the isolated test did not finish within \(timeout) s and was killed "
                    + "(a thread blocked on a fault?). Its last output:\n\(lines.suffix(15).joined(separator: "\n"))",
                    file: file, line: line)
            return text
        }
        guard rc == 0 else {
            XCTFail("could not run the isolated test: \(String(cString: strerror(-rc)))", file: file, line: line)
            return text
        }
        if let skip = lines.first(where: { $0.hasPrefix("REL-SKIP:") }) {
            throw XCTSkip(String(skip.dropFirst("REL-SKIP:".count)).trimmingCharacters(in: .whitespaces))
        }
        let ran = text.contains("Executed 1 test, with 0 failures")
        if code != 0 || !ran {
            // Sanitizer reports first (their frames name the culprit), then XCTest's failures.
            var errors = lines.filter { $0.contains("Sanitizer") || $0.contains("runtime error")
                || $0.contains("    #0 ") || $0.contains("    #1 ") }
            errors += lines.filter { $0.contains("error") || $0.contains("failed") || $0.contains("Fatal") }
            let why = code >= 128 ? "killed by signal \(code - 128)" : "exit status \(code)"
            XCTFail("isolated test failed (\(why)):\n"
                    + (errors.isEmpty ? lines.suffix(20) : errors.suffix(20)).joined(separator: "\n"),
                    file: file, line: line)
        }
        return text
    }
}

/// A skip that also reaches the parent of an isolated test.
func relSkip(_ reason: String) -> XCTSkip {
    print("REL-SKIP: \(reason)")
    fflush(nil)
    return XCTSkip(reason)
}

/// A line the parent prints (and may parse): `REL: key value...`.
func report(_ s: String) {
    print("REL: \(s)")
    fflush(nil)
}

/// Values of `REL: key=value` lines in an isolated test's output.
func reported(_ output: String, _ key: String) -> [String] {
    output.split(separator: "\n").compactMap { l -> String? in
        guard l.hasPrefix("REL: \(key)=") else { return nil }
        return String(l.dropFirst("REL: \(key)=".count))
    }
}

/// Starts a thread running `body` (1 MiB stack).
@discardableResult
func spawn(_ body: @escaping @Sendable () -> Void) -> Thread {
    let t = Thread(block: body)
    t.stackSize = 1 << 20
    t.start()
    return t
}

/// Waits for `sem` up to `seconds`; true when it was signalled.
func waitFor(_ sem: DispatchSemaphore, _ seconds: Double) -> Bool {
    sem.wait(timeout: .now() + seconds) == .success
}

/// Sets vm.nr_hugepages so that `pages` huge pages are free for `body`, restoring the old value
/// after (also when the body throws). Throws a skip (with the reason) when that is impossible.
@discardableResult
func withHugePages<T>(_ pages: Int, _ body: () throws -> T) throws -> T {
    let rc = cuffd_test_hugetlb_reserve(pages)
    defer { cuffd_test_hugetlb_restore() }
    guard rc == 0 else {
        throw relSkip("cannot reserve \(pages) huge pages through /proc/sys/vm/nr_hugepages: \(String(cString: strerror(-rc)))")
    }
    return try body()
}

let MiB = 1 << 20
