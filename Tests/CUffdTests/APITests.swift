import CUffdTestSupport
import XCTest

/// UFFDIO_API handshake, the open paths and the feature probe.
final class APITests: XCTestCase {
    /// An API number other than UFFD_API is refused with EINVAL, and does not use up the handshake.
    func testWrongAPINumberRejected() throws { try runCTest(cuffd_test_api_bad_version) }
    /// A feature bit the kernel does not know is refused with EINVAL.
    func testUnknownFeatureRejected() throws { try runCTest(cuffd_test_api_unknown_feature) }
    /// A second UFFDIO_API on the same fd is refused with EINVAL.
    func testSecondHandshakeRejected() throws { try runCTest(cuffd_test_api_twice) }
    /// userfaultfd(2) and /dev/userfaultfd both give working fds and report which path was used.
    func testOpenPaths() throws { try runCTest(cuffd_test_open_paths) }
    /// The probe reports the ioctls and features, and every reported feature can be requested.
    func testProbeReportsFeatures() throws { try runCTest(cuffd_test_probe) }
}
