import CUffd
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Serves every process that hands its uffd over a listening socket, each with its own
/// ``ServedProcess`` (fd, regions, policy, handler, stats), from one memory file, until
/// ``stop()`` (or, with `once`, until the first served process is gone).
///
/// Connections are received on their own threads (a peer that sends nothing only costs its
/// thread until the timeout); a bad hand-off is reported and its connection closed, the other
/// processes are unaffected. A process is gone when it exited (its pid with the same start time
/// no longer exists; for a peer in another pid namespace, when its connection closed).
public final class SnapshotServer: Sendable {
    /// What the server does.
    public struct Configuration: Sendable {
        /// The memory file (read-only, not owned: the caller keeps it open while the server runs).
        public var memoryFile: Int32
        /// Its length at start-up (regions must fit inside the file's length at their hand-off).
        public var memoryFileLength: Int
        /// How each process is served.
        public var serve = ServeOptions()
        /// How long a connected peer may take to send its hand-off.
        public var receiveTimeoutMilliseconds: Int32 = 5000
        /// The largest hand-off body.
        public var maxBody = Handoff.defaultMaxBody
        /// Peers allowed (nil: any uid that can connect; the socket's mode decides).
        public var allowedUIDs: Set<UInt32>? = nil
        /// Serve one process, return when it is gone.
        public var once = false
        /// Hand-offs being received at once (more are closed at once).
        public var maxPendingConnections = 64
        /// How often liveness of the served processes is checked.
        public var pollMilliseconds: Int32 = 50
        /// How often each served process's counters are reported (``Event/stats(_:_:)``, with
        /// its huge-page coverage measured then); 0: never.
        public var statsIntervalMilliseconds: Int = 0

        /// Serving from `memoryFile` of `memoryFileLength` bytes.
        public init(memoryFile: Int32, memoryFileLength: Int) {
            self.memoryFile = memoryFile
            self.memoryFileLength = memoryFileLength
        }

        /// Serving from an image source (``ServeOptions/source``): a remote or packed snapshot
        /// from ``PageSources/shared(_:options:)``, one chunk cache for every VM served.
        public init(source: any PageSource) {
            memoryFile = -1
            memoryFileLength = source.length
            serve.source = source
        }
    }

    /// What happened, for the owner's log.
    public enum Event: Sendable {
        /// A hand-off was refused; its connection is closed.
        case rejected(peer: PeerCredentials?, error: HandoffError)
        /// A hand-off was accepted; serving starts right after this returns (a supervisor takes
        /// its duplicates of the fds here, before the first fault can be read).
        case adopting(ServedProcess)
        /// A process is being served (its first faults may already be resolved).
        case serving(ServedProcess)
        /// A process inherited from an earlier server is served again (its ranges were woken).
        case resumed(ServedProcess)
        /// A fault of a process could not be served; it got the fallback.
        case failure(ServedProcess, HandlerFailure)
        /// A process is still served: its counters so far, every
        /// ``Configuration/statsIntervalMilliseconds`` (the coverage measured just now).
        case stats(ServedProcess, ServeSummary)
        /// A process went away; its summary (its huge-page coverage: the last measured).
        case gone(ServedProcess, ServeSummary)
        /// The server stopped while the process still ran: it is no longer served here (its
        /// uffd may be served again by another server that holds a duplicate).
        case released(ServedProcess, ServeSummary)
    }

    /// How ``run()`` ended.
    public enum Outcome: Sendable {
        /// ``stop()`` was called.
        case stopped
        /// `once`: the served process is gone.
        case served(ServeSummary)
        /// `once`: the only hand-off was refused.
        case rejected(HandoffError)
    }

    /// The listening socket.
    public let listener: HandoffListener
    /// The configuration.
    public let configuration: Configuration
    private let onEvent: @Sendable (Event) -> Void
    private let live = Mutex<[ServedProcess]>([])
    private let stopping = Atomic<Bool>(false)
    private let pending = Atomic<Int>(0)
    private let nextID = Atomic<Int>(1)
    private let onceResult = Mutex<Outcome?>(nil)
    private let onceTaken = Atomic<Bool>(false)

    /// A server on `listener`; `onEvent` is called from the server's threads.
    public init(listener: HandoffListener, configuration: Configuration, onEvent: @escaping @Sendable (Event) -> Void = { _ in }) {
        self.listener = listener
        self.configuration = configuration
        self.onEvent = onEvent
    }

    /// The processes served now.
    public var served: [ServedProcess] { live.withLock { $0 } }

    /// Makes ``run()`` return (served processes are stopped by it; their faults queued so far
    /// are resolved first).
    public func stop() { stopping.store(true, ordering: .releasing) }

    /// Serves a process inherited from an earlier server (restart): adopts its uffd, starts
    /// serving, then wakes its ranges so faults the earlier server read but never resolved
    /// are delivered again. `id` keeps its number (the next ones continue after it).
    @discardableResult
    public func resume(id: Int, handoff: ReceivedHandoff, connection: Int32, peerStartTime: UInt64?) throws(UffdError) -> ServedProcess {
        while true {
            let n = nextID.load(ordering: .relaxed)
            if n > id || nextID.compareExchange(expected: n, desired: id + 1, ordering: .relaxed).exchanged { break }
        }
        let p = try ServedProcess(id: id, handoff: handoff, connection: connection, memoryFile: configuration.memoryFile,
                                  options: options(for: id), peerStartTime: peerStartTime)
        try p.start()
        p.wakeAll()
        if configuration.once { onceTaken.store(true, ordering: .relaxed) }
        live.withLock { $0.append(p) }
        onEvent(.resumed(p))
        return p
    }

    /// Accepts and serves until ``stop()`` (or the `once` process is gone); then stops every
    /// served process (a process still running is no longer served: its faults wait until a
    /// server adopts its uffd again or it exits).
    public func run() -> Outcome {
        let interval = UInt64(Swift.max(0, configuration.statsIntervalMilliseconds)) * 1_000_000
        var nextStats = cuffd_now_ns() &+ interval
        while !stopping.load(ordering: .acquiring) {
            if let c = try? listener.accept(timeoutMilliseconds: configuration.pollMilliseconds) {
                accepted(c)
            }
            reap()
            if interval > 0, cuffd_now_ns() >= nextStats {
                nextStats = cuffd_now_ns() &+ interval
                // Gone processes were reaped just before: these are measured while they run.
                for p in live.withLock({ $0 }) { onEvent(.stats(p, p.summary())) }
            }
            if configuration.once, let r = onceResult.withLock({ $0 }) {
                finish()
                return r
            }
        }
        finish()
        return .stopped
    }

    private func finish() {
        while pending.load(ordering: .acquiring) > 0 { usleep(10_000) }
        for p in live.withLock({ l in defer { l = [] }; return l }) {
            p.stop()
            onEvent(.released(p, p.summary()))
        }
    }

    private func accepted(_ c: Int32) {
        if configuration.once && onceTaken.load(ordering: .relaxed) {
            onEvent(.rejected(peer: Handoff.peerCredentials(c), error: HandoffError(.notAllowed, "--once: already serving a process")))
            Glibc.close(c)
            return
        }
        guard pending.wrappingAdd(1, ordering: .acquiringAndReleasing).oldValue < configuration.maxPendingConnections else {
            pending.wrappingSubtract(1, ordering: .releasing)
            onEvent(.rejected(peer: Handoff.peerCredentials(c), error: HandoffError(.socket, "too many hand-offs in progress")))
            Glibc.close(c)
            return
        }
        if configuration.once { onceTaken.store(true, ordering: .relaxed) }
        Thread.detachNewThread { [self] in
            defer { pending.wrappingSubtract(1, ordering: .releasing) }
            receive(c)
        }
    }

    private func receive(_ c: Int32) {
        let cfg = configuration
        let handoff: ReceivedHandoff
        do throws(HandoffError) {
            handoff = try Handoff.receive(on: c, timeoutMilliseconds: cfg.receiveTimeoutMilliseconds, maxBody: cfg.maxBody,
                                          allowedUIDs: cfg.allowedUIDs)
            // The file's size now (it may have changed since start-up).
            var st = stat()
            let length = cfg.serve.source == nil && cfg.memoryFile >= 0 && fstat(cfg.memoryFile, &st) == 0 ? Int(st.st_size) : cfg.memoryFileLength
            try GuestRegion.validate(handoff.regions, memoryFileLength: length)
        } catch {
            refuse(c, error)
            return
        }
        let startTime = ServedProcess.startTime(of: handoff.peer.pid)
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        do throws(UffdError) {
            let p = try ServedProcess(id: id, handoff: handoff, connection: c, memoryFile: cfg.memoryFile,
                                      options: options(for: id), peerStartTime: startTime)
            onEvent(.adopting(p))
            do throws(UffdError) { try p.start() } catch {
                onEvent(.gone(p, p.summary()))
                throw error
            }
            live.withLock { $0.append(p) }
            onEvent(.serving(p))
        } catch {
            handoff.uffd.close()
            refuse(c, HandoffError(.notUserfaultfd, "cannot serve it: \(error)"), peer: handoff.peer)
        }
    }

    private func refuse(_ c: Int32, _ e: HandoffError, peer: PeerCredentials? = nil) {
        onEvent(.rejected(peer: peer ?? Handoff.peerCredentials(c), error: e))
        Glibc.close(c)
        if configuration.once { onceResult.withLock { $0 = .rejected(e) } }
    }

    private func options(for id: Int) -> ServeOptions {
        var o = configuration.serve
        let inner = o.onFailure
        o.onFailure = { [weak self] f in
            inner?(f)
            guard let self, let p = self.live.withLock({ $0.first { $0.id == id } }) else { return }
            self.onEvent(.failure(p, f))
        }
        return o
    }

    /// Stops and reports every served process whose process is gone.
    private func reap() {
        let all = live.withLock { $0 }
        for p in all {
            let gone = p.peer.pid > 0 ? !p.peerAlive : p.connectionClosed
            guard gone else { continue }
            live.withLock { $0.removeAll { $0 === p } }
            p.stop()
            let s = p.summary()
            onEvent(.gone(p, s))
            if configuration.once { onceResult.withLock { $0 = .served(s) } }
        }
    }
}
