import XCTest
import UffdKit

/// The README's "Use it from Swift" example, verbatim (inside a function), run under a watchdog.
final class ReadmeExampleTests: XCTestCase {
    static func readmeExample() throws -> (Int, HandlerStats) {
        // --- README begin
        // 64 MiB whose pages are filled on first touch: generated here, a file with `FileSource(path:)`.
        let region = try MappedRegion(.anonymous(), length: 64 << 20)
        let uffd = try Userfaultfd()                 // user-mode faults only, non-blocking
        try uffd.register(region, modes: .missing)

        let source = PatternSource(length: region.length)
        let policy = ReadaheadPolicy(CopyPolicy(region: region, source: source),
                                     window: .adaptive(minPages: 1, maxPages: 64))
        var options = FaultHandler.Options()
        options.readers = 2                          // dedicated threads, never Swift's cooperative pool
        options.fallback = .poison                   // a policy that throws: SIGBUS, never a hung thread
        options.onFailure = { failure in print(failure) }
        let handler = FaultHandler(uffd: uffd, policy: policy, options: options)
        try handler.start()

        var sum = 0                                  // any thread may touch the memory now
        for offset in stride(from: 0, to: region.length, by: 4096) { sum &+= Int(region.bytes[offset]) }

        handler.stop()                               // faults already queued are still resolved
        print(sum, handler.stats())                  // faults, resolutions by op, bytes, latency p50/p99
        // --- README end
        return (sum, handler.stats())
    }

    func testReadmeExampleRuns() throws {
        let result = Box<Result<(Int, HandlerStats), any Error>?>(nil)
        withWatchdog(60, onTimeout: {}) {
            let r = Result { try ReadmeExampleTests.readmeExample() }
            result.update { $0 = r }
        }
        let (sum, stats) = try XCTUnwrap(result.value).get()
        var expected = 0
        for off in stride(from: 0, to: 64 << 20, by: 4096) { expected &+= Int(PatternSource.word(at: off, seed: 0x5EED) & 0xFF) }
        XCTAssertEqual(sum, expected)
        XCTAssertEqual(stats.bytes, 64 << 20)
        XCTAssertEqual(stats.fallbacks + stats.failures, 0)
    }
}
