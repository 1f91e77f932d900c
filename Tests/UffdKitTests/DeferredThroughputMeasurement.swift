import CUffd
import Foundation
import Synchronization
import XCTest
@testable import UffdKit

/// A deferred source with `connections` workers, each serving one request at a time after
/// `latency` (a stand-in for a remote store: RTT-bound, bounded parallelism).
private final class SlowSource: DeferredSource, @unchecked Sendable {
    let length: Int
    let chunkSize: Int
    let latency: useconds_t
    let data: UnsafeMutableRawPointer
    private let queue = Mutex<[(Int, Int, DeferredFetch)]>([])
    private let sem = DispatchSemaphore(value: 0)
    private let stopping = Atomic<Bool>(false)
    private var workers: [Thread] = []

    init(length: Int, chunkSize: Int, latencyMicros: useconds_t, connections: Int) {
        self.length = length
        self.chunkSize = chunkSize
        self.latency = latencyMicros
        data = .allocate(byteCount: length, alignment: 4096)
        fillPattern(data, length, seed: 3)
        for _ in 0..<connections {
            let t = Thread { [unowned self] in self.work() }
            t.start()
            workers.append(t)
        }
    }

    func shutdown() {
        stopping.store(true, ordering: .relaxed)
        for _ in workers { sem.signal() }
    }

    deinit { data.deallocate() }

    private func work() {
        while true {
            sem.wait()
            if stopping.load(ordering: .relaxed) { return }
            guard let (off, len, f) = queue.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { continue }
            usleep(latency)
            f.deliver(UnsafeRawBufferPointer(start: data + off, count: len))
        }
    }

    func fetch(offset: Int, length: Int, into fetch: DeferredFetch) {
        queue.withLock { $0.append((offset, length, fetch)) }
        sem.signal()
    }
}

/// The same latency answered synchronously on the reader thread (what a policy without
/// deferral has to do).
private struct SyncSlowPolicy: FaultPolicy {
    let base: UInt
    let data: UInt
    let latency: useconds_t
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        usleep(latency)
        return .copy(from: data + (fault.address - base), to: fault.address, length: basePageSize)
    }
}

/// Random 4 KiB faults from 8 threads against a source with 1 ms latency and 8 connections:
/// faults per second against the ideal (connections / latency), deferred vs synchronous, in
/// one run. A measurement, not a timed test: it asserts only that every byte is right, and
/// runs only when asked (`UFFDKIT_MEASURE=1`).
final class DeferredThroughputMeasurement: XCTestCase {
    func run(deferred: Bool, faults: Int, threads: Int, latency: useconds_t, connections: Int) throws -> Double {
        let page = basePageSize
        let len = 64 << 20
        let r = try MappedRegion(.anonymous(), length: len)
        let uffd = try Userfaultfd()
        try uffd.register(r, modes: .missing)
        let src = SlowSource(length: len, chunkSize: page, latencyMicros: latency, connections: connections)
        defer { src.shutdown() }
        let policy: any FaultPolicy = deferred
            ? DeferredCopyPolicy(destination: r.address, source: src)
            : SyncSlowPolicy(base: r.address, data: UInt(bitPattern: src.data), latency: latency)
        var o = FaultHandler.Options()
        o.fallback = .zeroFill
        let h = FaultHandler(uffd: uffd, policy: policy, options: o)
        try h.start()
        // Distinct random pages per thread.
        var pages = Array(0..<(len / page))
        var rng = SystemRandomNumberGenerator()
        pages.shuffle(using: &rng)
        let order = pages
        let per = faults / threads
        let base = r.address
        let bad = Atomic<Int>(0)
        let t0 = cuffd_now_ns()
        // Threads of their own (concurrentPerform would run only as many as there are CPUs).
        let group = DispatchGroup()
        for t in 0..<threads {
            group.enter()
            Thread.detachNewThread {
                for i in 0..<per {
                    let off = order[t * per + i] * page
                    let p = UnsafePointer<UInt8>(bitPattern: base + UInt(off))!
                    if p.pointee != src.data.load(fromByteOffset: off, as: UInt8.self) { bad.add(1, ordering: .relaxed) }
                }
                group.leave()
            }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 120), .success)
        let t1 = cuffd_now_ns()
        h.stop()
        uffd.close()
        XCTAssertEqual(bad.load(ordering: .relaxed), 0)
        XCTAssertEqual(h.stats().fallbacks + h.stats().failures, 0)
        return Double(per * threads) / (Double(t1 - t0) / 1e9)
    }

    func testMeasureDeferredThroughput() throws {
        guard ProcessInfo.processInfo.environment["UFFDKIT_MEASURE"] == "1" else {
            throw XCTSkip("set UFFDKIT_MEASURE=1 to measure")
        }
        let latency: useconds_t = 1000, connections = 8
        let ideal = Double(connections) / (Double(latency) / 1e6)
        let d = try run(deferred: true, faults: 8000, threads: 8, latency: latency, connections: connections)
        let s = try run(deferred: false, faults: 1600, threads: 8, latency: latency, connections: connections)
        print(String(format: "deferred: %.0f faults/s = %.2fx ideal (%.0f/s); synchronous: %.0f faults/s = %.2fx ideal",
                     d, d / ideal, ideal, s, s / ideal))
    }
}
