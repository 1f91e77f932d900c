import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// Who may use userfaultfd, and what UffdKit asks for by default.
final class SecurityTests: XCTestCase {
    /// Reads 8 bytes from a pipe into `dst` with read(2): the kernel writes the memory
    /// (copy_to_user), so a fault there is a kernel-mode fault. Returns read's result and errno,
    /// or nil when read() did not return within `timeout`.
    func kernelWrite(into dst: UInt, timeout: Double) -> (Int, Int32)? {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { return (-1, errno) }
        var v: UInt64 = 0x1122_3344_5566_7788
        _ = Glibc.write(fds[1], &v, 8)
        let result = Locked<(Int, Int32)?>(nil)
        let done = DispatchSemaphore(value: 0)
        let rfd = fds[0]
        spawn {
            let n = Glibc.read(rfd, UnsafeMutableRawPointer(bitPattern: dst), 8)
            let e = errno
            result.withLock { $0 = (n, e) }
            done.signal()
        }
        let ok = waitFor(done, timeout)
        if ok { close(fds[0]); close(fds[1]) }
        return ok ? result.withLock { $0 } : nil
    }

    /// Decided: `Userfaultfd()` handles user-mode faults only (UFFD_USER_MODE_ONLY): a kernel
    /// access to a missing registered page fails with EFAULT at once instead of waiting for the
    /// handler, so the fd cannot stall the kernel. `.kernelFaults` is the explicit opt-in: the
    /// kernel's access then waits for the handler like a user access.
    func testDefaultIsUserModeOnlyKernelFaultsAreAnExplicitOptIn() throws {
        try isolated {
            let ps = basePageSize
            let r = try MappedRegion(.anonymous(), length: 4 * ps)
            let u = try Userfaultfd()
            XCTAssertTrue(u.userModeOnly)
            try u.register(r, modes: .missing)
            let got = kernelWrite(into: r.address, timeout: 5)
            XCTAssertNotNil(got, "a kernel access blocked on a user-mode-only fd")
            XCTAssertEqual(got?.0, -1)
            XCTAssertEqual(got?.1, EFAULT)

            let k: Userfaultfd
            do { k = try Userfaultfd(options: [.nonBlocking, .kernelFaults]) } catch {
                throw relSkip("cannot open a userfaultfd that handles kernel faults here: \(error)")
            }
            XCTAssertFalse(k.userModeOnly)
            let r2 = try MappedRegion(.anonymous(), length: 4 * ps)
            try k.register(r2, modes: .missing)
            let h = FaultHandler(uffd: k, policy: ZeroFillPolicy(region: r2))
            try h.start()
            let got2 = kernelWrite(into: r2.address, timeout: 5)
            h.stop()
            XCTAssertEqual(got2?.0, 8, "the kernel's access was not served by the handler")
            XCTAssertEqual(r2.pointer.load(as: UInt64.self), 0x1122_3344_5566_7788)
            XCTAssertEqual(h.stats().missingFaults, 1)
        }
    }

    static let sysctl = "/proc/sys/vm/unprivileged_userfaultfd"
    static let device = "/dev/userfaultfd"

    /// The unprivileged matrix: vm.unprivileged_userfaultfd 0/1 x /dev/userfaultfd 0600/0666,
    /// opened for real as uid/gid 65534 (the test binary re-executed through setpriv). Every
    /// refusal must be the documented errno with UffdError's explanation naming the fixes.
    /// The sysctl and the device mode are restored afterwards, also on failure.
    func testUnprivilegedOpenMatrix() throws {
        if isIsolatedChild { return try unprivilegedChild() }
        guard getuid() == 0 else { throw XCTSkip("needs root to change vm.unprivileged_userfaultfd and /dev/userfaultfd (running as uid \(getuid()))") }
        let oldSysctl = rel_sysctl_read(Self.sysctl)
        guard oldSysctl >= 0 else { throw XCTSkip("\(Self.sysctl): \(String(cString: strerror(Int32(-oldSysctl))))") }
        var st = stat()
        let haveDevice = stat(Self.device, &st) == 0
        let oldMode = st.st_mode & 0o7777
        defer {
            XCTAssertEqual(rel_sysctl_write(Self.sysctl, oldSysctl), 0, "could not restore \(Self.sysctl)")
            if haveDevice { XCTAssertEqual(chmod(Self.device, oldMode), 0, "could not restore \(Self.device) mode") }
        }
        for sys in [0, 1] {
            for mode: mode_t in haveDevice ? [0o600, 0o666] : [0o600] {
                XCTAssertEqual(rel_sysctl_write(Self.sysctl, sys), 0)
                if haveDevice { XCTAssertEqual(chmod(Self.device, mode), 0) }
                let out = try isolated(timeout: 30, asUser: (65534, 65534)) {}
                let deviceOpen = haveDevice && mode == 0o666
                func check(_ key: String, _ expected: String, _ line: UInt = #line) {
                    let got = reported(out, key).first ?? "(not reported)"
                    XCTAssertTrue(got.hasPrefix(expected), "sysctl=\(sys) mode=\(String(mode, radix: 8)) \(key): \(got), expected \(expected)", line: line)
                }
                // User-mode-only (the default) is open to everyone, whatever the sysctl.
                check("default", "ok umo=true device=false")
                // Kernel faults: the sysctl, or the device when this user may open it.
                check("kernelFaults", sys == 1 ? "ok umo=false device=false" : deviceOpen ? "ok umo=false device=true" : "err EPERM")
                check("kernelFaultsNoDevice", sys == 1 ? "ok umo=false" : "err EPERM")
                check("deviceOnly", deviceOpen ? "ok" : haveDevice ? "err EACCES" : "err ENOENT")
                check("handler", "ok")
                for refusal in reported(out, "explanation") {
                    XCTAssertTrue(refusal.contains("vm.unprivileged_userfaultfd") && refusal.contains("/dev/userfaultfd"),
                                  "the refusal does not name the fixes: \(refusal)")
                }
            }
        }
    }

    /// As uid 65534: open in each way, report the outcome; then serve one fault end to end.
    func unprivilegedChild() throws {
        report("uid=\(getuid()) euid=\(geteuid())")
        XCTAssertNotEqual(geteuid(), 0)
        func attempt(_ key: String, _ o: Userfaultfd.Options) {
            do {
                let u = try Userfaultfd(options: o)
                report("\(key)=ok umo=\(u.userModeOnly) device=\(u.openedThroughDevice)")
            } catch {
                let name = error.errno == .notPermitted ? "EPERM" : error.errno == .permissionDenied ? "EACCES"
                    : error.errno == .noSuchFileOrDirectory ? "ENOENT" : "\(error.errno)"
                report("\(key)=err \(name) \(error.operation)")
                if error.operation == .open && (error.errno == .notPermitted || error.errno == .permissionDenied) {
                    report("explanation=\(error.explanation)")
                }
            }
        }
        attempt("default", .default)
        attempt("kernelFaults", [.nonBlocking, .kernelFaults])
        attempt("kernelFaultsNoDevice", [.nonBlocking, .kernelFaults, .noDevice])
        attempt("deviceOnly", [.nonBlocking, .deviceOnly])
        // The default path works end to end without privileges.
        do {
            let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
            let (_, h) = try startHandler(r) { _ in CopyPolicy(region: r, source: PatternSource(length: r.length)) }
            let got = readPages(r.address, [0, 1, 2, 3], pageSize: basePageSize, timeout: 5)
            h.stop()
            let ok = (0..<4).allSatisfy { got?[$0] == .value(patternWord($0)) }
            report("handler=\(ok ? "ok" : "wrong data \(String(describing: got))")")
        } catch {
            report("handler=err \(error)")
        }
    }
}
