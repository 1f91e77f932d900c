import CUffd
import Foundation
import XCTest
@testable import UffdKit

/// One handler session: open a fd with `features`, register `region` for `modes`, run a
/// handler with the policy, run `body` under a watchdog, stop, and return the stats.
struct Session {
    let uffd: Userfaultfd
    let handler: FaultHandler

    init(_ region: MappedRegion, features: Features = [], modes: RegisterMode = .missing,
         options: FaultHandler.Options = .init(), policy: (Userfaultfd) throws -> any FaultPolicy) throws {
        uffd = try Userfaultfd(features: features)
        try uffd.register(region, modes: modes)
        handler = FaultHandler(uffd: uffd, policy: try policy(uffd), options: options)
        try handler.start()
    }

    /// Runs `body` under a watchdog of `seconds`; on timeout closes the fd and stops.
    @discardableResult
    func run(_ seconds: Double = 60, file: StaticString = #filePath, line: UInt = #line,
             _ body: @escaping @Sendable () -> Void) -> Bool {
        let uffd = self.uffd, handler = self.handler
        return withWatchdog(seconds, file: file, line: line, onTimeout: {
            uffd.close()
            handler.stop()
        }, body)
    }

    /// Stops the handler, closes the fd (so a verification that touches a page nobody
    /// resolved reads zeros and fails instead of hanging) and returns the stats.
    func finish() -> HandlerStats {
        handler.stop()
        uffd.close()
        return handler.stats()
    }
}

/// Skips unless the kernel offers `features`.
func require(_ features: Features) throws {
    let have = try Userfaultfd.probe()
    let missing = features.subtracting(have)
    if !missing.isEmpty { throw XCTSkip("kernel does not offer \(missing)") }
}
