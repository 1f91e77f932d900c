import CUffd
import Foundation
import SystemPackage
import XCTest
@testable import UffdKit

/// How many of this process's descriptors are userfaultfds.
private func userfaultfdCount() -> Int {
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)"))?
        .contains("userfaultfd") == true }.count
}

final class FaultHandlerLifecycleTests: XCTestCase {
    /// Readers that do not come up within startTimeout: start() throws ETIMEDOUT (it used to
    /// return as if started), the handler is not running, and the late readers stop on their
    /// own and close the run's descriptors; a handler started normally afterwards serves.
    func testStartThrowsWhenReadersDoNotComeUpInTime() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
        let uffd = try Userfaultfd()
        try uffd.register(r, modes: .missing)
        let before = userfaultfdCount()
        var o = FaultHandler.Options()
        o.readers = 2
        o.startTimeout = .milliseconds(200)
        o.readerStartHook = { usleep(1_000_000) }
        let slow = FaultHandler(uffd: uffd, policy: ZeroFillPolicy(start: r.address, length: r.length), options: o)
        XCTAssertThrowsError(try slow.start()) { e in
            XCTAssertEqual((e as? UffdError)?.errno, .timedOut)
            XCTAssertEqual((e as? UffdError)?.operation, .handler)
        }
        XCTAssertFalse(slow.isRunning)
        // The late readers see the stop and end; the last one closes the dup'd uffd.
        let end = Date().addingTimeInterval(10)
        while userfaultfdCount() > before && Date() < end { usleep(10_000) }
        XCTAssertEqual(userfaultfdCount(), before, "the failed start left descriptors open")

        let h = FaultHandler(uffd: uffd, policy: ZeroFillPolicy(start: r.address, length: r.length))
        try h.start()
        let base = r.address
        let ok = withWatchdog(20, onTimeout: { uffd.close(); h.stop() }) {
            XCTAssertEqual(UnsafePointer<UInt8>(bitPattern: base)!.pointee, 0)
        }
        XCTAssertTrue(ok)
        h.stop()
        XCTAssertEqual(h.stats().missingFaults, 1)
    }

    /// stop() closes the run's descriptors (dup'd uffd, stop eventfd) once the readers are done.
    func testStopClosesTheRunsDescriptors() throws {
        let r = try MappedRegion(.anonymous(), length: 4 * basePageSize)
        let uffd = try Userfaultfd()
        let before = userfaultfdCount()
        var o = FaultHandler.Options()
        o.readers = 3
        let h = FaultHandler(uffd: uffd, policy: ZeroFillPolicy(start: r.address, length: r.length), options: o)
        try h.start()
        XCTAssertEqual(userfaultfdCount(), before + 2, "the readers' dup and the deferred table's dup")
        h.stop()
        XCTAssertEqual(userfaultfdCount(), before)
    }
}
