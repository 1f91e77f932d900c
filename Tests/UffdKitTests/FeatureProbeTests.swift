import SystemPackage
import UffdKit
import XCTest

/// FeatureProbe answers from the running kernel: the handshake's features and ioctls, and the
/// ioctls of a probe registration per memory type.
final class FeatureProbeTests: XCTestCase {
    func testFeaturesAndFdIoctls() throws {
        let probe = try FeatureProbe()
        XCTAssertEqual(probe.features, try Userfaultfd.probe())
        XCTAssertTrue(probe.ioctls.isSuperset(of: [.register, .unregister, .api]), "\(probe.ioctls)")
        XCTAssertEqual(FeatureProbe.apiVersion, 0xAA)
        XCTAssertTrue(Features.known.contains([.pagefaultFlagWP, .move]))
        XCTAssertEqual(Features.move.bits, [16])
        XCTAssertEqual(Features.known.bits.first, 0)
    }

    func testRangeIoctlsPerMemoryType() throws {
        let probe = try FeatureProbe()
        let anon = try probe.rangeIoctls(.anonymous())
        XCTAssertTrue(anon.isSuperset(of: [.copy, .zeropage, .wake]), "\(anon)")
        XCTAssertFalse(anon.contains(.continue), "anonymous memory has no page cache: \(anon)")
        if probe.features.contains(.minorShmem) {
            let shmem = try probe.rangeIoctls(.shmem)
            XCTAssertTrue(shmem.isSuperset(of: [.copy, .continue]), "\(shmem)")
        }
        // MINOR on anonymous memory: the kernel refuses the registration (EINVAL), named as such.
        XCTAssertThrowsError(try probe.rangeIoctls(.anonymous(), modes: .minor)) { error in
            XCTAssertEqual((error as? UffdError)?.operation, .register)
            XCTAssertEqual((error as? UffdError)?.errno, .invalidArgument)
        }
    }

    /// With a huge page leased, the hugetlb range offers COPY and no ZEROPAGE; without one (not
    /// root), the probe names the map as the reason.
    func testHugetlbRangeOrTheReason() throws {
        let probe = try FeatureProbe()
        let ran = try withHugePages(1) {
            let ioctls = try probe.rangeIoctls(.hugetlb)
            XCTAssertTrue(ioctls.contains(.copy), "\(ioctls)")
            XCTAssertFalse(ioctls.contains(.zeropage), "hugetlb has no UFFDIO_ZEROPAGE: \(ioctls)")
        }
        if !ran {
            let result = Result { () throws(UffdError) -> Ioctls in try probe.rangeIoctls(.hugetlb) }
            if case .failure(let error) = result {
                XCTAssertEqual(error.operation, .map, "\(error)")
                throw XCTSkip("no huge page could be leased (not root?): \(error)")
            }
        }
    }
}
