import CUffd
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The descriptors one run of a handler's readers uses: a dup of the userfaultfd (so that a
/// `Userfaultfd.close()` while they run cannot make them read a reused fd number) and the stop
/// eventfd. Every reader holds it, and so does the handler while the run lasts; the last one to
/// let go closes both. After a `Userfaultfd.close()` that drops the last reference to the file
/// and releases every thread still blocked on it.
final class ReaderFiles: Sendable {
    /// The readers' descriptor of the userfaultfd.
    let uffd: Int32
    /// Readable = stop.
    let stop: Int32

    /// Dups `uffd` and makes the stop eventfd.
    init(dupOf uffd: Int32) throws(UffdError) {
        let fd = fcntl(uffd, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw UffdError(.handler, Errno(rawValue: errno), detail: "dup of the userfaultfd") }
        let efd = cuffd_eventfd()
        guard efd >= 0 else {
            Glibc.close(fd)
            throw UffdError(.handler, rc: efd, detail: "eventfd")
        }
        self.uffd = fd
        self.stop = efd
    }

    /// Tells every reader of the run to stop (idempotent).
    func signalStop() { _ = cuffd_eventfd_signal(stop) }

    deinit {
        Glibc.close(stop)
        Glibc.close(uffd)
    }
}

/// Counts readers that reached their loop; `start()` waits on it (a POSIX semaphore: no polling).
final class ReadySignal: @unchecked Sendable {
    private let sem: UnsafeMutablePointer<sem_t>

    init() {
        sem = .allocate(capacity: 1)
        sem_init(sem, 0, 0)
    }

    deinit {
        sem_destroy(sem)
        sem.deallocate()
    }

    /// One reader is ready.
    func signal() { sem_post(sem) }

    /// Waits until `count` readers signalled or `timeout` passed; true when all did.
    func wait(count: Int, timeout: Duration) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        let (s, atto) = timeout.components
        let ns = Int(deadline.tv_nsec) + Int(atto / 1_000_000_000)
        deadline.tv_sec += Int(s) + ns / 1_000_000_000
        deadline.tv_nsec = ns % 1_000_000_000
        for _ in 0..<count {
            while sem_timedwait(sem, &deadline) != 0 {
                if errno == EINTR { continue }
                return false
            }
        }
        return true
    }
}

/// One run of a handler, from `start()` to `stop()`: its readers, their threads, their files,
/// and the table of deferred resolutions (nil when disabled).
struct HandlerRun: @unchecked Sendable {
    let readers: [Reader]
    let threads: [pthread_t]
    let files: ReaderFiles
    let deferred: DeferredTable?
}
