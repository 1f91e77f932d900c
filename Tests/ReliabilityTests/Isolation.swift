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
        var exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? CommandLine.arguments[0]
        let spec = testSpecifier
        var out = [CChar](repeating: 0, count: 64 * 1024)
        var code: Int32 = 0
        // As another user: through setpriv (real, effective and saved ids, no groups), from a
        // copy of this binary in a folder that user can reach (the checkout may be in a 0700
        // folder such as root's home or a mktemp -d), with that folder as working directory.
        var args = [exe, spec]
        var staged: StagedExecutable?
        defer { staged?.remove() }
        if let u = asUser {
            let s = try StagedExecutable(copying: exe, for: u.uid)
            staged = s
            exe = s.path
            args = ["/usr/bin/setpriv", "--reuid=\(u.uid)", "--regid=\(u.gid)", "--clear-groups", s.path, spec]
        }
        let cargs = args.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        let cwd = staged?.directory
        let rc: Int32 = {
            var argv: [UnsafePointer<CChar>?] = cargs.map { UnsafePointer($0) } + [nil]
            return argv.withUnsafeMutableBufferPointer { a in
                out.withUnsafeMutableBufferPointer { o in
                    withOptionalCString(cwd) { dir in
                        rel_run_child(a.baseAddress, isolatedChildVariable, spec, dir, Int32(timeout * 1000),
                                      o.baseAddress, o.count, &code)
                    }
                }
            }
        }()
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
        if asUser != nil && (code == 126 || code == 127) && !text.contains("Test Suite") {
            // setpriv or the exec of the copy failed: the machine does not let that user run it.
            throw XCTSkip("cannot run the test binary as uid \(asUser!.uid) here (exit \(code)): "
                          + lines.suffix(3).joined(separator: " | "))
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

private func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let s else { return body(nil) }
    return s.withCString { body($0) }
}

/// A copy of an executable in a fresh folder another user can reach and execute (0755 folder
/// and binary, on a file system mounted with exec), removed by `remove()`. The test binary
/// loads only the toolchain's shared libraries (RUNPATH /opt/swift/usr/lib/swift/linux), which
/// every user can read, so the binary alone is enough.
struct StagedExecutable {
    let directory: String
    let path: String

    /// Throws XCTSkip naming why when no candidate folder works.
    init(copying exe: String, for uid: UInt32) throws {
        var reasons: [String] = []
        for parent in ["/tmp", "/var/tmp", "/dev/shm"] {
            if let why = Self.unreachable(parent) { reasons.append("\(parent): \(why)"); continue }
            var template = Array("\(parent)/uffdkit-as-\(uid)-XXXXXX".utf8CString)
            guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
                reasons.append("\(parent): mkdtemp: \(String(cString: strerror(errno)))"); continue
            }
            let dir = String(cString: made)
            let dst = dir + "/" + (exe as NSString).lastPathComponent
            do {
                try FileManager.default.copyItem(atPath: exe, toPath: dst)
                guard chmod(dir, 0o755) == 0, chmod(dst, 0o755) == 0 else {
                    throw NSError(domain: "chmod", code: Int(errno))
                }
            } catch {
                try? FileManager.default.removeItem(atPath: dir)
                reasons.append("\(parent): copy failed: \(error)"); continue
            }
            directory = dir
            path = dst
            return
        }
        throw XCTSkip("no folder that uid \(uid) can reach to run a copy of the test binary from: "
                      + reasons.joined(separator: "; "))
    }

    /// Why other users could not execute a file in `dir`, or nil when they can.
    static func unreachable(_ dir: String) -> String? {
        let noexec = rel_mounted_noexec(dir)
        if noexec < 0 { return String(cString: strerror(-noexec)) }
        if noexec == 1 { return "mounted noexec" }
        var p = dir
        while !p.isEmpty {
            var st = stat()
            guard stat(p, &st) == 0 else { return "\(p): \(String(cString: strerror(errno)))" }
            if st.st_mode & 0o001 == 0 { return "\(p) is not searchable by other users" }
            if p == "/" { break }
            p = (p as NSString).deletingLastPathComponent
        }
        return nil
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }
}
