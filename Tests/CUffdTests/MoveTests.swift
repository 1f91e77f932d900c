import CUffdTestSupport
import XCTest

/// UFFDIO_MOVE on private anonymous memory (the only memory type it applies to).
final class MoveTests: XCTestCase {
    /// 4 KiB pages move: the destination holds the data, the source pages are empty.
    func testMove4K_anon() throws { try runCTest(cuffd_test_move_4k, .anon) }
    /// A 2 MiB THP source moves as a whole PMD into an aligned empty destination.
    func testMoveTHPWholePMD_anon() throws { try runCTest(cuffd_test_move_thp, .anon) }
    /// A THP source is split when less than a PMD moves (half at a time into a NOHUGEPAGE destination).
    func testMoveTHPSplitIntoNoHugepageDestination_anon() throws { try runCTest(cuffd_test_move_thp_nohuge_dst, .anon) }
    /// A whole 2 MiB THP moved in one call into a MADV_NOHUGEPAGE destination: data moves, source empties
    /// (the kernel keeps the PMD whole there; the split path is the partial move above).
    func testMoveTHPWholeIntoNoHugepageDestination_anon() throws { try runCTest(cuffd_test_move_thp_whole_nohuge_dst, .anon) }
    /// A source hole: ENOENT (with the pages before it done) without ALLOW_SRC_HOLES, success with it.
    func testMoveSourceHoles_anon() throws { try runCTest(cuffd_test_move_src_holes, .anon) }
    /// A populated destination: EEXIST, nothing moved.
    func testMoveIntoPopulatedDestination_anon() throws { try runCTest(cuffd_test_move_eexist, .anon) }
    /// Source pages shared with a forked child: EBUSY; after the child exits and a write, success.
    func testMoveSharedWithChildBusy_anon() throws { try runCTest(cuffd_test_move_ebusy, .anon) }
}
