import CUffd
import Dispatch
import Foundation
import Synchronization
import UffdKit

/// What a worker does with one base page.
enum PageAction: UInt8, Sendable {
    /// Read the first word (the fault is a read fault).
    case read
    /// Write the page's marker word (see ``Workload/marker(_:)``).
    case write
    /// Leave the page alone (e.g. a poisoned page).
    case skip
}

/// The faulting workload: real threads (Foundation `Thread`, i.e. pthreads), each touching its
/// contiguous share of the base pages in sequential or shuffled order. Reads are summed into
/// memory so the optimizer cannot drop them. The caller's thread waits with a watchdog and
/// draws the progress bar.
final class Workload: @unchecked Sendable {
    let base: UInt
    let pages: Int
    let threads: Int
    let order: AccessOrder
    let actions: [PageAction]
    /// Extra jobs run on their own threads next to the workers (e.g. a snapshot writer).
    let companions: [@Sendable () -> Void]
    /// CPU every worker pins itself to (benchmarks), nil: not pinned.
    let pin: Int32?
    private let touched = Atomic<Int>(0)
    private let finished = Atomic<Int>(0)
    private let sums: UnsafeMutablePointer<UInt64>
    private let done = DispatchSemaphore(value: 0)

    /// The value a writer stores in the first word of base page `index`.
    static func marker(_ index: Int) -> UInt64 { 0xA5C3_0000_0000_0000 | UInt64(index) }

    init(base: UInt, length: Int, threads: Int, order: AccessOrder, actions: [PageAction],
         companions: [@Sendable () -> Void] = [], pin: Int32? = nil) {
        self.pin = pin
        self.base = base
        self.pages = length / basePageSize
        self.threads = threads
        self.order = order
        self.actions = actions
        self.companions = companions
        sums = .allocate(capacity: threads)
        sums.initialize(repeating: 0, count: threads)
    }

    deinit { sums.deallocate() }

    /// Pages each action touches.
    var writtenPages: Int { actions.reduce(0) { $0 + ($1 == .write ? 1 : 0) } }

    /// The outcome of a run.
    struct Outcome {
        var seconds: Double
        var pagesTouched: Int
    }

    /// Runs the workers and companions; returns when all finished. When the watchdog expires
    /// first, reports it and exits the process with status 1 (the workers may be blocked in a
    /// fault or still touching the region, so nothing may be torn down under them).
    func run(timeout: Double, progress: ProgressBar) throws(CLIError) -> Outcome {
        let start = DispatchTime.now().uptimeNanoseconds
        let jobs = threads + companions.count
        for t in 0..<threads {
            let thread = Thread { [self] in self.work(t) }
            thread.name = "uffdctl-worker-\(t)"
            thread.start()
        }
        for job in companions {
            let thread = Thread { [self] in
                job()
                self.finished.add(1, ordering: .releasing)
                self.done.signal()
            }
            thread.name = "uffdctl-companion"
            thread.start()
        }
        let deadline = start + UInt64(timeout * 1e9)
        while finished.load(ordering: .acquiring) < jobs {
            _ = done.wait(timeout: .now() + .milliseconds(100))
            progress.update(touched.load(ordering: .relaxed))
            if DispatchTime.now().uptimeNanoseconds > deadline && finished.load(ordering: .acquiring) < jobs {
                progress.finish()
                // Exit from here, without unwinding: returning would unmap the region (and stop
                // the handler) under workers that are still touching it.
                CLIError.failed("watchdog: the workload did not finish within \(timeout) s "
                    + "(\(touched.load(ordering: .relaxed)) of \(pages) pages touched); stopping").report()
                fflush(nil)
                _exit(CLIExit.failed.rawValue)
            }
        }
        let end = DispatchTime.now().uptimeNanoseconds
        progress.finish()
        return Outcome(seconds: Double(end - start) / 1e9, pagesTouched: touched.load(ordering: .relaxed))
    }

    private func work(_ t: Int) {
        if let pin { _ = cuffd_pin_self(pin) }
        let lo = t * pages / threads, hi = (t + 1) * pages / threads
        var order = Array(lo..<hi)
        if self.order == .random {
            var x: UInt64 = 0x9E37_79B9_7F4A_7C15 &* UInt64(t + 1)
            for i in stride(from: order.count - 1, to: 0, by: -1) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                order.swapAt(i, Int(x % UInt64(i + 1)))
            }
        }
        let page = basePageSize
        var sum: UInt64 = 0
        var pending = 0
        for i in order {
            let p = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(i * page))!
            switch actions[i] {
            case .read: sum &+= p.pointee
            case .write: p.pointee = Workload.marker(i)
            case .skip: break
            }
            pending += 1
            if pending == 64 {
                touched.add(pending, ordering: .relaxed)
                pending = 0
            }
        }
        touched.add(pending, ordering: .relaxed)
        sums[t] = sum
        finished.add(1, ordering: .releasing)
        done.signal()
    }
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal, not --quiet, and
/// the run has lasted more than a second.
final class ProgressBar {
    private let enabled: Bool
    private let total: Int
    private let label: String
    private let start = DispatchTime.now().uptimeNanoseconds
    private var drawn = false

    init(quiet: Bool, total: Int, label: String) {
        enabled = !quiet && isatty(STDERR_FILENO) == 1
        self.total = max(total, 1)
        self.label = label
    }

    func update(_ done: Int) {
        guard enabled, DispatchTime.now().uptimeNanoseconds - start > 1_000_000_000 else { return }
        let width = 30
        let filled = min(width, done * width / total)
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
        let text = "\r\(label) [\(bar)] \(min(100, done * 100 / total))% \(done)/\(total) pages"
        FileHandle.standardError.write(Data(text.utf8))
        drawn = true
    }

    func finish() {
        guard drawn else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
        drawn = false
    }
}
