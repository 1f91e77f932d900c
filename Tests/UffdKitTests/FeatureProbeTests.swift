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

    func testHugetlbRangeOrTheReason() throws {
        let probe = try FeatureProbe()
        let result = Result { () throws(UffdError) -> Ioctls in try probe.rangeIoctls(.hugetlb) }
        if case .failure(let error) = result, error.operation == .map {
            throw XCTSkip("no free huge pages to probe hugetlb: \(error)")
        }
        let ioctls = try result.get()
        XCTAssertTrue(ioctls.contains(.copy), "\(ioctls)")
        XCTAssertFalse(ioctls.contains(.zeropage), "hugetlb has no UFFDIO_ZEROPAGE: \(ioctls)")
    }
}
