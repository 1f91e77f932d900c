import CUffdTestSupport
import XCTest

/// The C test table (Tests/CUffdTestSupport/ct_*.c, a CT_CASES table at the end of each file),
/// one XCTest per file's group; each case is logged as `behaviour_memtype`. Adding a test is one
/// C function and one row; only a new file adds a group here.
final class CTests: HugetlbReservingTestCase {
    /// The groups run below; a group in the table but not here fails testEveryGroupRuns.
    /// ("sigbus" runs one XCTest per row in InThreadTests.)
    static let groups = ["api", "fill", "move", "wp", "wp_state", "events", "chains", "loop", "deferred", "support",
                         "sigbus"]

    /// UFFDIO_API handshake, open paths, the probe, REGISTER modes/ownership, resolve outcomes.
    func testApi() throws { try runCGroup("api") }
    /// COPY, ZEROPAGE, CONTINUE, POISON: exact ranges, EEXIST on repeat, partial progress.
    func testFill() throws { try runCGroup("fill") }
    /// UFFDIO_MOVE on private anonymous memory.
    func testMove() throws { try runCGroup("move") }
    /// UFFDIO_WRITEPROTECT, WP faults, WP_UNPOPULATED, WP_ASYNC + PAGEMAP_SCAN.
    func testWp() throws { try runCGroup("wp") }
    /// Write-protect state in the page tables (pagemap bit 57): fork, pins, markers, page-out.
    func testWpState() throws { try runCGroup("wp_state") }
    /// Non-cooperative events, EAGAIN while one is unread, SIGBUS mode, THREAD_ID/EXACT_ADDRESS.
    func testEvents() throws { try runCGroup("events") }
    /// Scenarios across processes: SIGBUS mode with a forked child, the FORK/REMAP/REMOVE chain.
    func testChains() throws { try runCGroup("chains") }
    /// cuffd_loop_run: batches, stats, fallbacks, stop, EAGAIN/EEXIST, several loops.
    func testLoop() throws { try runCGroup("loop") }
    /// Deferred resolution through the loop (OP_DEFER, cuffd_deferred_*).
    func testDeferred() throws { try runCGroup("deferred") }
    /// The core's shared helpers: the SIGBUS catcher and its chaining, the deadline.
    func testSupport() throws { try runCGroup("support") }

    /// Every group of the table has its XCTest above, every row names a function, and every
    /// label is unique (a log line names exactly one case).
    func testEveryGroupRuns() {
        var tableGroups: [String] = []
        var labels = Set<String>()
        for g in 0..<cuffd_test_group_count() {
            let name = String(cString: cuffd_test_group_name(g))
            tableGroups.append(name)
            for c in cCases(group: name) ?? [] {
                XCTAssertNotNil(c.row.pointee.fn, "\(c.label) has no function")
                XCTAssertTrue(labels.insert(c.label).inserted, "two cases are named \(c.label)")
                XCTAssertFalse(String(cString: c.row.pointee.doc).isEmpty, "\(c.label) has no doc sentence")
            }
        }
        XCTAssertEqual(tableGroups.sorted(), Self.groups.sorted())
    }
}
