import CUffd
import CUffdTestSupport
import Dispatch
import Foundation
import XCTest
@testable import UffdKit

/// Runs `body` on its own thread and waits at most `seconds`. On timeout, `onTimeout` runs
/// (stop the handler, close the fd, so blocked threads fault normally and finish), and the
/// test fails instead of hanging. Returns whether the body finished in time.
@discardableResult
func withWatchdog(_ seconds: Double, file: StaticString = #filePath, line: UInt = #line,
                  onTimeout: () -> Void, _ body: @escaping @Sendable () -> Void) -> Bool {
    let done = DispatchSemaphore(value: 0)
    let t = Thread {
        body()
        done.signal()
    }
    t.stackSize = 1 << 20
    t.start()
    if done.wait(timeout: .now() + seconds) == .success { return true }
    XCTFail("watchdog: the faulting code did not finish within \(seconds) s", file: file, line: line)
    onTimeout()
    // Closing the fd unblocks every waiter; give the body a moment to finish.
    _ = done.wait(timeout: .now() + 10)
    return false
}

/// A thread-safe accumulator for results of touching threads.
final class Box<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var v: T
    init(_ v: T) { self.v = v }
    var value: T { lock.lock(); defer { lock.unlock() }; return v }
    func update(_ f: (inout T) -> Void) { lock.lock(); f(&v); lock.unlock() }
}

/// Touches one byte per `stride` of `[base, base+length)` from `threads` threads (interleaved
/// chunks of 1 MiB), reading (or writing `writeValue`). Returns the sum of the bytes read, so
/// the optimizer cannot drop the reads.
func touch(_ base: UInt, length: Int, threads: Int, stride: Int = basePageSize, write writeValue: UInt8? = nil) -> UInt64 {
    let chunk = 1 << 20
    let chunks = (length + chunk - 1) / chunk
    let total = Box<UInt64>(0)
    DispatchQueue.concurrentPerform(iterations: threads) { t in
        var sum: UInt64 = 0
        var c = t
        while c < chunks {
            // The first multiple of `stride` in the chunk, so strides are global.
            var off = (c * chunk + stride - 1) / stride * stride
            let end = Swift.min(length, (c + 1) * chunk)
            while off < end {
                let p = UnsafeMutablePointer<UInt8>(bitPattern: base + UInt(off))!
                if let w = writeValue { p.pointee = w }
                sum &+= UInt64(p.pointee)
                off += stride
            }
            c += threads
        }
        let s = sum
        total.update { $0 &+= s }
    }
    return total.value
}

/// Sum of all bytes, word-wise (observable, fast enough in debug).
func wordSum(_ p: UnsafeRawPointer, _ length: Int) -> UInt64 {
    let w = p.assumingMemoryBound(to: UInt64.self)
    var s: UInt64 = 0
    for i in 0..<(length / 8) { s &+= w[i] }
    return s
}

/// Fills `p` with the pattern of `PatternSource(seed:)`.
func fillPattern(_ p: UnsafeMutableRawPointer, _ length: Int, seed: UInt64, from offset: Int = 0) {
    let w = p.assumingMemoryBound(to: UInt64.self)
    for i in 0..<(length / 8) { w[i] = PatternSource.word(at: offset + i * 8, seed: seed) }
}

let MiB = 1 << 20

/// Leases `pages` huge pages for the body (cuffd_test_hugetlb_reserve: added to vm.nr_hugepages
/// beside other test runs' leases, exactly those given back after). Returns false (body not run)
/// when they cannot be had.
func withHugePages(_ pages: Int, _ body: () throws -> Void) throws -> Bool {
    defer { cuffd_test_hugetlb_restore() }
    guard cuffd_test_hugetlb_reserve(pages) == 0 else { return false }
    try body()
    return true
}
