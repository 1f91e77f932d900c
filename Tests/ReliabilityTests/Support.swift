import CUffd
import CUffdTestSupport
import Foundation
import Synchronization
import XCTest
import UffdKit

#if canImport(Glibc)
import Glibc
#endif

/// A policy made of a closure, forwarding scratch size and events to `inner` (when given).
final class ClosurePolicy: FaultPolicy, @unchecked Sendable {
    let inner: (any FaultPolicy)?
    let body: @Sendable (Fault, FaultContext) throws -> Resolution
    init(inner: (any FaultPolicy)? = nil, _ body: @escaping @Sendable (Fault, FaultContext) throws -> Resolution) {
        self.inner = inner
        self.body = body
    }
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        try body(fault, copy context)
    }
    func handle(event: Event, context: borrowing FaultContext) { inner?.handle(event: event, context: context) }
    var scratchBytes: Int { inner?.scratchBytes ?? 0 }
}

/// What one read of a page's first word gave.
enum Access: Equatable, CustomStringConvertible {
    case value(UInt64)
    case sigbus
    case sigsegv
    var description: String {
        switch self {
        case .value(let v): "0x" + String(v, radix: 16)
        case .sigbus: "SIGBUS"
        case .sigsegv: "SIGSEGV"
        }
    }
}

/// Reads the first word of `pages` of `[base, ...)` (page size `ps`) from `threads` threads,
/// catching SIGBUS/SIGSEGV. Returns page -> access, or nil when a thread did not finish within
/// `timeout` seconds (it is blocked on a fault).
func readPages(_ base: UInt, _ pages: [Int], pageSize ps: Int, threads: Int = 1, write: Bool = false,
               timeout: Double = 10) -> [Int: Access]? {
    let results = Locked<[Int: Access]>([:])
    let group = DispatchGroup()
    for t in 0..<threads {
        group.enter()
        spawn {
            var i = t
            while i < pages.count {
                let page = pages[i]
                let p = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(page * ps))!
                var v: UInt64 = 0
                let r = write ? rel_add_u64(p, 1, &v) : rel_read_u64(p, &v)
                let a: Access = r == Int32(REL_ACCESS_OK.rawValue) ? .value(v) : r == Int32(REL_ACCESS_SIGBUS.rawValue) ? .sigbus : .sigsegv
                results.withLock { $0[page] = a }
                i += threads
            }
            group.leave()
        }
    }
    guard group.wait(timeout: .now() + timeout) == .success else { return nil }
    return results.withLock { $0 }
}

/// The first word of page `page` of a PatternSource image with `seed`.
func patternWord(_ page: Int, _ ps: Int = basePageSize, seed: UInt64 = 0x5EED) -> UInt64 {
    PatternSource.word(at: page * ps, seed: seed)
}

/// Anonymous memory that no deinit unmaps (for tests that unmap or move it themselves).
func rawAnon(_ length: Int) -> UInt {
    let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    precondition(p != MAP_FAILED)
    return UInt(bitPattern: p)
}

/// Fails the test (and says which pages) unless every page read `expected(page)`.
func assertPages(_ got: [Int: Access]?, _ pages: [Int], file: StaticString = #filePath, line: UInt = #line,
                 _ expected: (Int) -> Access) {
    guard let got else { return XCTFail("a reading thread is still blocked on a fault (watchdog)", file: file, line: line) }
    var bad: [String] = []
    for p in pages where got[p] != expected(p) {
        bad.append("page \(p): \(got[p].map { "\($0)" } ?? "not read"), expected \(expected(p))")
    }
    XCTAssertTrue(bad.isEmpty, bad.prefix(5).joined(separator: "; "), file: file, line: line)
}

/// A handler on a fresh fd over `region` (registered MISSING) with `policy`.
func startHandler(_ region: MappedRegion, features: Features = [], modes: RegisterMode = .missing,
                  options: FaultHandler.Options = .init(), _ policy: (Userfaultfd) throws -> any FaultPolicy) throws
    -> (Userfaultfd, FaultHandler) {
    let uffd = try Userfaultfd(features: features)
    try uffd.register(region, modes: modes)
    let h = FaultHandler(uffd: uffd, policy: try policy(uffd), options: options)
    try h.start()
    return (uffd, h)
}

/// Skips (also from an isolated child) unless the kernel offers `features`.
func requireFeatures(_ features: Features) throws {
    let missing = features.subtracting(try Userfaultfd.probe())
    if !missing.isEmpty { throw relSkip("kernel does not offer \(missing)") }
}

/// Options with a fallback.
func options(_ fallback: FaultHandler.Fallback = .poison, readers: Int = 1, batch: Int = 16) -> FaultHandler.Options {
    var o = FaultHandler.Options()
    o.fallback = fallback
    o.readers = readers
    o.batch = batch
    return o
}

/// A value behind an NSLock (pthread mutex): ThreadSanitizer understands it, while
/// Synchronization.Mutex's futex-based lock on Linux shows up as false races.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

/// A shareable atomic counter (an Atomic cannot travel in a tuple).
final class Counter: Sendable {
    private let value = Atomic<Int>(0)
    /// Adds one; returns the new value.
    func next() -> Int { value.add(1, ordering: .relaxed).newValue }
    var count: Int { value.load(ordering: .relaxed) }
}
