import Foundation
import XCTest

/// Sessions the policy layer newly supports (issue 9): zero-fill on hugetlb (bug 3) and
/// CONTINUE on private shmem (bug 4). Both exited non-zero before.
final class PolicySessionTests: XCTestCase {
    /// `continue --memory shmem-private`: the page cache is filled through the shared view,
    /// the private view is registered MINOR; its writes stay private (the second view keeps the
    /// pattern). Before: exit 2 ("needs --memory shmem or hugetlb").
    func testContinueShmemPrivateSession() throws {
        let text = try runUffdctl(["continue", "--memory", "shmem-private", "--size", "4M"])
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("continue: 4.0 MiB shmem-private"), text.stdout)
        XCTAssertTrue(text.stdout.contains("minor 1024"), text.stdout)
        let r = try runUffdctl(["continue", "--memory", "shmem-private", "--size", "4M", "--write", "--threads", "3", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertEqual(r.json?["memory"] as? String, "shmem-private")
        XCTAssertEqual(flag(r.json, "verified"), true)
        XCTAssertEqual((r.json?["faults_by_kind"] as? [String: Any]).flatMap { number($0, "minor") }, 1024)
        XCTAssertEqual((r.json?["resolutions"] as? [String: Any]).flatMap { number($0, "continue") }, 1024)
        XCTAssertEqual((r.json?["checks"] as? [String: Any]).flatMap { flag($0, "second_view_agrees") }, true)
    }

    /// `zeropage --memory hugetlb` runs, copying zeros, and says so. Before: exit 3 (the range
    /// offers no UFFDIO_ZEROPAGE). Huge pages are reserved for the run and the sysctl restored.
    func testZeropageHugetlbCopiesZeros() throws {
        let huge = HugePageReservation()
        defer { huge.restore() }
        guard huge.add(4) else { throw XCTSkip("cannot reserve 4 huge pages (vm.nr_hugepages: not root, or taken by another process)") }
        let text = try runUffdctl(["zeropage", "--memory", "hugetlb", "--size", "4M"], timeout: 30)
        if text.code == 3, text.stderr.contains("huge pages") {
            throw XCTSkip("huge pages were taken by another process: \(text.stderr)")
        }
        XCTAssertEqual(text.code, 0, text.stderr)
        XCTAssertTrue(text.stdout.contains("hugetlb has no UFFDIO_ZEROPAGE: zeros are copied"), text.stdout)
        XCTAssertTrue(text.stdout.contains("verified     every byte of 4.0 MiB matched zeros"), text.stdout)
        let r = try runUffdctl(["zeropage", "--memory", "hugetlb", "--size", "4M", "--write", "--json"], timeout: 30)
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertEqual(flag(r.json, "verified"), true)
        XCTAssertEqual(r.json?["zero_fill"] as? String, "copy")
        XCTAssertEqual(number(r.json, "failures"), 0)
        XCTAssertEqual(number(r.json, "fallbacks"), 0)
        XCTAssertNotNil((r.json?["resolutions"] as? [String: Any]).flatMap { number($0, "copy") })
    }

    /// `--memory hugetlb-private` (a hugetlb memfd mapped private) in every session that
    /// supports it: copy, zeropage (zeros copied; also --in-thread), continue (the page cache through the shared
    /// view; --write copies stay private), writeprotect, poison; move says it needs anon.
    /// Before: exit 2, "hugetlb-private" was not a --memory value.
    func testHugetlbPrivateSessions() throws {
        let huge = HugePageReservation()
        defer { huge.restore() }
        guard huge.add(8) else { throw XCTSkip("cannot reserve 8 huge pages (vm.nr_hugepages: not root, or no memory)") }
        let sessions: [[String]] = [["copy"], ["zeropage"], ["zeropage", "--in-thread"], ["continue", "--write"], ["writeprotect"], ["poison"]]
        for args in sessions {
            let r = try runUffdctl(args + ["--memory", "hugetlb-private", "--size", "4M", "--json"], timeout: 60)
            if r.code == 3, r.stderr.contains("huge pages") {
                throw XCTSkip("huge pages were taken by another process: \(r.stderr)")
            }
            XCTAssertEqual(r.code, 0, "\(args): \(r.stderr)")
            XCTAssertEqual(r.json?["memory"] as? String, "hugetlb-private", "\(args)")
            XCTAssertEqual(flag(r.json, "verified"), true, "\(args)")
            XCTAssertEqual(number(r.json, "page_size"), Double(2 << 20), "\(args)")
            XCTAssertEqual(number(r.json, "failures"), 0, "\(args)")
            if args[0] == "zeropage" { XCTAssertEqual(r.json?["zero_fill"] as? String, "copy") }
            if args[0] == "continue" {
                XCTAssertEqual((r.json?["checks"] as? [String: Any]).flatMap { flag($0, "second_view_agrees") }, true,
                               "private writes reached the page cache")
            }
        }
        let move = try runUffdctl(["move", "--memory", "hugetlb-private", "--size", "4M"])
        XCTAssertEqual(move.code, 2, move.stderr)
        XCTAssertTrue(move.stderr.contains("anonymous memory only"), move.stderr)
        let help = try runUffdctl(["copy", "--help"])
        XCTAssertTrue(help.stdout.contains("hugetlb-private"), help.stdout)
    }
}
