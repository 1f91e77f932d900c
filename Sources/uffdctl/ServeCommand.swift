import ArgumentParser
import Dispatch
import Foundation
import Logging
import Synchronization
import UffdKit

/// `uffdctl serve`: serves the guest memory of processes (Firecracker microVMs restored with
/// the Uffd backend, or any program handing over its uffd) from a memory file.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve restored VMs' memory from a snapshot memory file (Firecracker's Uffd backend).",
        discussion: """
            Listens on --socket. Each process that connects sends one message: a JSON array of \
            regions ({"base_host_virt_addr","size","offset","page_size"} and the legacy \
            "page_size_kib", both in bytes) with exactly one userfaultfd in SCM_RIGHTS — \
            Firecracker's protocol (v1.1 through v1.16). Each is served in its own handler: \
            missing faults are copied from --memory-file at the region's offset (4 KiB or 2 MiB \
            hugetlbfs pages), removed ranges (balloon, UFFD_EVENT_REMOVE) read as zeros after. \
            A bad hand-off is logged and its connection closed; the others go on. \
            --memory-file is a raw file, a packed snapshot (uffdctl snapshot pack), or either behind \
            http(s):// or s3://BUCKET/KEY (--endpoint, AWS_* credentials): remote and packed memory \
            is fetched in chunks through one cache shared by every VM, without stalling other \
            faults; a chunk that cannot be fetched gets the fallback and is logged. When a served \
            process exits, a summary is logged (faults, bytes, time to first fault, latency).

            Restart without freezing VMs: the command you start is a small supervisor holding \
            duplicates of the listening socket and of every served uffd; the serving is done by \
            a worker process (its pid is logged as `worker started worker_pid=N` and written to \
            --worker-pid-file). If the worker dies (crash, kill -9) a new one adopts every uffd \
            and wakes the served ranges (faults the dead worker read but never resolved are \
            delivered again). SIGHUP to the supervisor re-executes it (an upgraded binary takes \
            over) with the socket and every uffd inherited. SIGINT/SIGTERM end serving: a VM \
            still running freezes at its next fault (Firecracker keeps its own copy of the uffd, \
            so the kernel keeps the fault waiting); stop the server after its VMs, or use SIGHUP.

            Firecracker restore example:
              # 1. snapshot the paused source VM
              curl --unix-socket /tmp/src.sock -X PUT \\
                http://localhost/snapshot/create -d '{"snapshot_type":"Full",
                "snapshot_path":"vm.snap","mem_file_path":"vm.mem"}'
              # 2. serve its memory, 3. restore it in a new Firecracker
              uffdctl serve --socket /tmp/uffd.sock --memory-file vm.mem &
              firecracker --api-sock /tmp/fc.sock &
              curl --unix-socket /tmp/fc.sock -X PUT \\
                http://localhost/snapshot/load -d '{"snapshot_path":"vm.snap",
                "mem_backend":{"backend_type":"Uffd",
                "backend_path":"/tmp/uffd.sock"},"resume_vm":true}'
            Run the server as the user Firecracker runs as, or pass --allow-uid.

            Exit codes: 0 stopped by a signal, or with --once the VM was served cleanly; 1 a \
            failure (with --once: some faults got the fallback); 2 bad usage or input (memory \
            file missing, unreadable or empty, a corrupt packed snapshot, a URL that cannot be \
            opened; with --once: the hand-off was refused).
            """
    )

    @Option(help: ArgumentHelp("The Unix socket to listen on (Firecracker's mem_backend.backend_path).", valueName: "path"))
    var socket: String

    @Option(name: .customLong("memory-file"), help: ArgumentHelp("The snapshot's memory (mem_file_path): a raw file, a packed snapshot (uffdctl snapshot pack), or either behind http(s)://HOST/PATH or s3://BUCKET/KEY.", valueName: "file|url"))
    var memoryFile: String

    @OptionGroup(title: "Remote and packed memory (http(s)://, s3://, packed snapshots)")
    var remote: RemoteSourceOptions

    @Option(help: "Reader threads per served VM.")
    var readers: Int = 1

    @Option(help: ArgumentHelp("Pin each VM's readers to these CPUs (comma-separated).", valueName: "cpu[,cpu...]"))
    var pin: String?

    @Option(help: ArgumentHelp("Pages resolved per fault: a size (e.g. 64K) or adaptive (up to 2M); 2 MiB guests resolve at least a huge page.",
                               valueName: "size|adaptive"))
    var readahead: String?

    @Option(name: .customLong("spin-polls"), help: ArgumentHelp("Busy-poll: non-blocking reads before each poll() (lower fault latency when the readers have a CPU of their own; 0 sleeps in poll).", valueName: "n"))
    var spinPolls: UInt32 = 0

    @Flag(help: "Log one JSON object per line.")
    var json = false

    @Option(name: .customLong("record-working-set"),
            help: ArgumentHelp("When a VM goes away, write the order of its first faults (memory-file offset, time) here (the last VM's wins).", valueName: "file"))
    var recordWorkingSet: String?

    @Option(name: .customLong("prefetch"),
            help: ArgumentHelp("Install the pages of this working set (recorded from this memory file) at hand-off, on a background thread per region; faults keep priority.", valueName: "file"))
    var prefetch: String?

    @Flag(help: "Serve one VM, then exit with its outcome.")
    var once = false

    @Option(name: .customLong("socket-mode"), help: ArgumentHelp("Permissions of the socket (octal).", valueName: "mode"))
    var socketMode: String = "0600"

    @Option(name: .customLong("allow-uid"), help: ArgumentHelp("Accept hand-offs only from this uid (repeatable; default: any uid that can open the socket).", valueName: "uid"))
    var allowUID: [UInt32] = []

    @Option(name: .customLong("receive-timeout"), help: ArgumentHelp("Milliseconds a connected peer may take to send its hand-off.", valueName: "ms"))
    var receiveTimeout: Int32 = 5000

    @Option(help: ArgumentHelp("What a page that cannot be read from the memory file gets: poison (a memory error; needs UFFD_FEATURE_POISON on the sender's uffd, which Firecracker does not enable: its pages get zeros) or zero. Always logged.", valueName: "poison|zero"))
    var fallback: String = "poison"

    @Option(help: ArgumentHelp("How pages of a raw local file are read: mmap (the file mapped read-only; UFFDIO_COPY copies straight from the page cache) or pread (a read per fault into a buffer, then the copy: two copies). Remote and packed memory is read through the chunk cache.", valueName: "mmap|pread"))
    var source: String = "mmap"

    @Option(name: .customLong("stats-interval"), help: ArgumentHelp("Log each served VM's counters so far every this many seconds (`VM stats`: faults, bytes, latency, huge_page_bytes of its memory, measured then); 0: never.", valueName: "seconds"))
    var statsInterval: Double = 10

    @Option(name: .customLong("pid-file"), help: ArgumentHelp("Write the supervisor's pid here (send it SIGHUP to restart).", valueName: "path"))
    var pidFile: String?

    @Option(name: .customLong("worker-pid-file"), help: ArgumentHelp("Write the current worker's pid here (rewritten on each restart).", valueName: "path"))
    var workerPidFile: String?

    @Flag(name: .customLong("no-supervisor"), help: "Serve in this process (no restart without freezing VMs).")
    var noSupervisor = false

    @Option(name: .customLong("worker-state"), help: ArgumentHelp("Internal: inherited state (fd of a JSON description).", visibility: .private))
    var workerState: Int32?

    @Option(name: .customLong("supervisor-state"), help: ArgumentHelp("Internal: state inherited by a re-executed supervisor.", visibility: .private))
    var supervisorState: Int32?

    func run() throws {
        try check()
        if workerState == nil && supervisorState == nil, recordWorkingSet != nil || prefetch != nil {
            // A recording that does not match the memory file is exit 2 here, before serving.
            let image = try openImage()
            var o = ServeOptions()
            defer { if image.fd >= 0 { close(image.fd) } }
            try workingSetOptions(&o, image: image)
        }
        // A worker or a re-executed supervisor serves the file the first process opened (the
        // path may name a new snapshot by now); only the first process opens a local
        // --memory-file. A URL is reopened by each worker (there is no fd to inherit); the
        // ETag the first process saw is inherited and checked, so a worker never serves a
        // replaced object to VMs restored from the old one.
        if let workerState {
            let st = try WorkerState.read(fd: workerState)
            try runWorker(inherited: st, image: try inheritedImage(st))
        } else if let supervisorState {
            let st = try WorkerState.read(fd: supervisorState)
            try runSupervisor(inherited: st, memFD: st.memoryFD, etag: st.etag)
        } else {
            if noSupervisor {
                try runWorker(inherited: nil, image: try openImage())
            } else {
                // Opened here to fail at start-up with one line; the worker opens its own (a
                // URL's source is dropped here: the supervisor never reads pages).
                let (fd, etag) = try { () throws(CLIError) -> (Int32, String?) in let i = try openImage(); return (i.fd, i.etag) }()
                try runSupervisor(inherited: nil, memFD: fd, etag: etag)
            }
        }
    }

    /// What the served memory is: a raw local file (its fd: pread or mmap, the fast path) or an
    /// image source (remote, or a packed file read through its inherited fd).
    struct Image {
        var fd: Int32 = -1
        var length: Int
        var source: (any PageSource)?
        var etag: String? { (source as? ChunkedSource).map(\.etag) }
    }

    var isURL: Bool { memoryFile.contains("://") }

    /// Opens --memory-file at start-up; every way it can be unusable (missing, unreadable,
    /// empty, a corrupt packed snapshot, a URL that answers 404/403, an unknown host, a refused
    /// connection) is one line and exit 2.
    func openImage() throws(CLIError) -> Image {
        if isURL { return Image(length: 0, source: try openShared(memoryFile)).withLength() }
        let path = memoryFile.hasPrefix("file:") ? String(memoryFile.dropFirst(5)) : memoryFile
        let (fd, length) = try openMemoryFile(path)
        return try image(fd: fd, length: length)
    }

    /// A local file's image: raw (the fd) or packed (opened through /proc/self/fd, so a worker
    /// serves the very file the first process opened).
    func image(fd: Int32, length: Int) throws(CLIError) -> Image {
        guard (try? PageSources.isPackedFile("/proc/self/fd/\(fd)")) == true else {
            return Image(fd: fd, length: length, source: nil)
        }
        return Image(fd: fd, length: 0, source: try openShared("/proc/self/fd/\(fd)")).withLength()
    }

    func openShared(_ spec: String) throws(CLIError) -> any PageSource {
        let o = try remote.options()
        do { return try PageSources.shared(spec, options: o) } catch {
            let reason = error.detail.isEmpty ? "\(error.errno)" : error.detail
            throw CLIError.usage("--memory-file \(memoryFile): \(reason)")
        }
    }

    /// A worker's image: the inherited fd, or the URL reopened (same ETag or refuse).
    func inheritedImage(_ st: WorkerState) throws(CLIError) -> Image {
        if st.memoryFD >= 0 { return try image(fd: st.memoryFD, length: try fileLength(st.memoryFD)) }
        let img = try openImage()
        if let want = st.etag, !want.isEmpty, let got = img.etag, got != want {
            throw CLIError.failed("--memory-file \(memoryFile) changed since the VMs were restored (ETag \(got), was \(want)): "
                                  + "serving it would mix two snapshots; restart the server after its VMs are gone")
        }
        return img
    }

    /// Option checks (not ArgumentParser's validate(): its errors are not CLIError lines).
    func check() throws(CLIError) {
        guard readers >= 1, readers <= 64 else { throw .usage("--readers must be 1...64 (got \(readers))") }
        _ = try cpus()
        _ = try mode()
        _ = try serveOptions()
        guard source == "mmap" || source == "pread" else { throw .usage("--source '\(source)': use mmap or pread") }
        guard statsInterval >= 0, statsInterval.isFinite, statsInterval <= 86_400 else {
            throw .usage("--stats-interval must be 0...86400 seconds (got \(statsInterval))")
        }
        guard receiveTimeout > 0 else { throw .usage("--receive-timeout must be positive (got \(receiveTimeout))") }
    }

    func mode() throws(CLIError) -> mode_t {
        guard let m = mode_t(socketMode, radix: 8), m <= 0o777 else {
            throw .usage("--socket-mode '\(socketMode)' is not an octal mode like 0600 or 0660")
        }
        return m
    }

    func cpus() throws(CLIError) -> [Int]? {
        guard let pin else { return nil }
        let n = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        var out: [Int] = []
        for part in pin.split(separator: ",") {
            guard let c = Int(part.trimmingCharacters(in: .whitespaces)), c >= 0, c < n else {
                throw .usage("--pin '\(pin)': give CPU numbers 0...\(n - 1), comma-separated")
            }
            out.append(c)
        }
        guard !out.isEmpty else { throw .usage("--pin '\(pin)': give CPU numbers 0...\(n - 1), comma-separated") }
        return out
    }

    func serveOptions() throws(CLIError) -> ServeOptions {
        var o = ServeOptions()
        o.readers = readers
        o.cpus = try cpus()
        o.spinPolls = spinPolls
        switch fallback {
        case "poison": o.fallback = .poison
        case "zero": o.fallback = .zeroFill
        default: throw .usage("--fallback '\(fallback)': use poison or zero")
        }
        if recordWorkingSet != nil && prefetch != nil {
            throw .usage("--record-working-set and --prefetch cannot be combined: prefetched pages do not fault, so the recording would miss them (record on a run without --prefetch)")
        }
        if let readahead {
            if readahead == "adaptive" {
                o.readaheadBytes = 2 << 20
                o.adaptiveReadahead = true
            } else {
                let b = try parseSize(readahead, option: "--readahead")
                guard b % basePageSize == 0 else { throw .usage("--readahead \(readahead) is not a multiple of the page size (\(basePageSize) bytes)") }
                guard b <= 64 << 20 else { throw .usage("--readahead \(readahead) is larger than 64 MiB") }
                o.readaheadBytes = b
            }
        }
        return o
    }

    /// The memory file, read-only; exit 2 when it is missing, unreadable, not a file or empty.
    func openMemoryFile(_ path: String) throws(CLIError) -> (Int32, Int) {
        do { return try openInputFile(path) } catch {
            throw CLIError.usage("--memory-file: \(error.message)")
        }
    }

    // MARK: Worker: the process that serves

    func fileLength(_ fd: Int32) throws(CLIError) -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .usage("the inherited memory file (fd \(fd)) is unusable: \(errnoName(errno))") }
        return Int(st.st_size)
    }

    func runWorker(inherited: WorkerState?, image: Image) throws {
        let memFD = image.fd, memLength = image.length
        let log = makeServeLogger(json: json, label: "uffdctl serve")
        if let inherited {
            for vm in inherited.vms {
                if let end = vm.regions.map({ $0.offset + $0.size }).max(), end > memLength {
                    throw CLIError.usage("--memory-file \(memoryFile) is \(memLength) bytes, shorter than the regions of the VM served before the restart (\(end) bytes)")
                }
            }
        }
        let listener: HandoffListener
        if let inherited {
            listener = HandoffListener(adopting: inherited.listenFD, path: socket)
        } else {
            let m = try mode()
            do throws(HandoffError) { listener = try HandoffListener(path: socket, mode: m) } catch {
                throw CLIError.failed("--socket \(socket): \(error.message)")
            }
        }
        if let workerPidFile { try? "\(getpid())\n".write(toFile: workerPidFile, atomically: true, encoding: .utf8) }
        let control = inherited?.controlFD ?? -1
        var config = SnapshotServer.Configuration(memoryFile: image.source == nil ? memFD : -1, memoryFileLength: memLength)
        config.serve = try serveOptions()
        config.serve.source = image.source
        if image.source == nil && source == "mmap" {
            // The page-cache pages are mapped on a thread of their own (~0.3 µs per 4 KiB page:
            // seconds for a big image), so serving, and a restarted worker's waiting VMs, never
            // wait for it; its one line comes from that thread when it ends.
            do {
                config.serve.memoryFileMapping = try MemoryFileMapping(fd: memFD, length: memLength, populate: .background) { o in
                    let m: Logger.Metadata = ["bytes": "\(o.bytes)", "seconds": .string(String(format: "%.3f", o.seconds))]
                    switch o.error {
                    case nil: log.info("memory file populated", metadata: m)
                    case .canceled?: break // the server is stopping
                    case let e?: log.warning("memory file populate stopped (the copies map the rest)",
                                             metadata: m.merging(["error": .string(errnoName(e.rawValue))]) { $1 })
                    }
                }
            } catch {
                throw CLIError.failed("--source mmap: \(error)")
            }
        }
        try workingSetOptions(&config.serve, image: image)
        let recordPath = recordWorkingSet
        config.receiveTimeoutMilliseconds = receiveTimeout
        config.allowedUIDs = allowUID.isEmpty ? nil : Set(allowUID)
        config.once = once
        config.statsIntervalMilliseconds = Int((statsInterval * 1000).rounded())
        let failuresLogged = Mutex<[Int: Int]>([:])
        let server = SnapshotServer(listener: listener, configuration: config) { event in
            switch event {
            case .rejected(let peer, let error):
                log.warning("refused hand-off", metadata: peerMeta(peer).merging(["reason": "\(error)"]) { $1 })
            case .serving(let p), .resumed(let p):
                var m = peerMeta(p.peer)
                m["vm"] = "\(p.id)"
                m["regions"] = .string(p.regions.map(\.description).joined(separator: ", "))
                m["features"] = "\(p.uffd.features)"
                m["fallback"] = p.effectiveFallback == .poison ? "poison" : "zero"
                if case .resumed = event {
                    log.info("resumed VM after restart (ranges woken)", metadata: m)
                } else {
                    log.info("serving VM", metadata: m)
                }
            case .adopting(let p):
                if control >= 0 { WorkerState.announce(p, over: control) }
            case .failure(let p, let f):
                let n = failuresLogged.withLock { $0[p.id, default: 0] += 1; return $0[p.id]! }
                if n <= 10 {
                    log.error("fault not served from the memory file", metadata: ["vm": "\(p.id)", "peer_pid": "\(p.peer.pid)", "failure": "\(f)"])
                } else if n == 11 {
                    log.error("more faults not served (counted in the summary)", metadata: ["vm": "\(p.id)"])
                }
            case .stats(let p, let s):
                log.info("VM stats", metadata: summaryMeta(p, s))
            case .gone(let p, let s):
                log.info("VM gone", metadata: summaryMeta(p, s).merging(imageMeta(image.source)) { $1 })
                if let recordPath, let ws = p.workingSet() {
                    do {
                        try ws.write(to: recordPath)
                        log.info("working set recorded", metadata: ["vm": "\(p.id)", "file": .string(recordPath), "pages": "\(ws.entries.count)",
                                                                   "bytes": "\(ws.bytes)"])
                    } catch {
                        log.error("cannot write the working set", metadata: ["vm": "\(p.id)", "file": .string(recordPath), "error": "\(error)"])
                    }
                }
                if control >= 0 { WorkerState.announceGone(p.id, over: control) }
            case .released(let p, let s):
                log.info(control >= 0 ? "VM handed back to the supervisor" : "VM no longer served (server stopping)",
                         metadata: summaryMeta(p, s))
            }
        }
        if let inherited {
            for vm in inherited.vms {
                let uffd = Userfaultfd(adopting: vm.uffdFD, features: Userfaultfd.features(ofFD: vm.uffdFD) ?? [])
                let h = ReceivedHandoff(uffd: uffd, regions: vm.regions, peer: vm.peer)
                do {
                    try server.resume(id: vm.id, handoff: h, connection: vm.connectionFD, peerStartTime: vm.peerStartTime)
                } catch {
                    log.error("cannot resume VM", metadata: ["vm": "\(vm.id)", "error": "\(error)"])
                }
            }
        }
        // Stopping on SIGINT/SIGTERM is in place before "listening" is logged: whoever waits
        // for that line may signal at once (until then the default action would kill us).
        for sig in [SIGINT, SIGTERM] { signal(sig, SIG_IGN) }
        let sources = [SIGINT, SIGTERM].map { sig -> DispatchSourceSignal in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { server.stop() }
            s.resume()
            return s
        }
        var listening: Logger.Metadata = ["socket": .string(socket), "memory_file": .string(memoryFile),
                                          "memory_bytes": "\(memLength)", "worker_pid": "\(getpid())"]
        // The memory file's pages in the page cache are being mapped (the COPY fast path).
        if config.serve.memoryFileMapping != nil { listening["memory_populate"] = "background" }
        log.info(inherited?.vms.isEmpty == false ? "worker serving after restart" : "listening", metadata: listening)
        let outcome = server.run()
        sources.forEach { $0.cancel() }
        if inherited == nil && control < 0 { listener.close() }
        switch outcome {
        case .stopped:
            log.info("stopped")
        case .served(let s):
            if !s.clean { throw ExitCode(CLIExit.failed.rawValue) }
        case .rejected:
            throw ExitCode(CLIExit.usage.rawValue)
        }
    }
}

extension ServeCommand {
    /// The memory file's identity and the checked prefetch recording, into `o`.
    func workingSetOptions(_ o: inout ServeOptions, image: Image) throws(CLIError) {
        let memLength = image.length
        guard recordWorkingSet != nil || prefetch != nil else { return }
        if recordWorkingSet != nil && prefetch != nil {
            throw .usage("--record-working-set and --prefetch cannot be combined: prefetched pages do not fault, so the recording would miss them (record on a run without --prefetch)")
        }
        let identity: WorkingSet.Identity
        do {
            identity = try WorkingSet.Identity(of: image.source ?? MemoryFileSource(fd: image.fd, fileOffset: 0, length: memLength))
        } catch {
            throw .usage("--memory-file \(memoryFile): cannot read it to identify it: \(error)")
        }
        o.imageIdentity = identity
        o.recordWorkingSet = recordWorkingSet != nil
        if let prefetch {
            let ws = try loadWorkingSet(prefetch)
            do {
                try ws.check(against: identity, servedLength: memLength)
            } catch {
                throw .usage("--prefetch \(prefetch): \(error.detail)")
            }
            o.prefetch = ws
        }
    }
}

func peerMeta(_ peer: PeerCredentials?) -> Logger.Metadata {
    guard let peer else { return [:] }
    return ["peer_pid": "\(peer.pid)", "peer_uid": "\(peer.uid)", "peer_gid": "\(peer.gid)"]
}

/// The shared image's counters so far (every VM of this worker together): how much came from
/// the server and how much from the chunk cache.
func imageMeta(_ source: (any PageSource)?) -> Logger.Metadata {
    guard let c = (source as? ChunkedSource)?.counters else { return [:] }
    return ["image_requests": "\(c.requests)", "image_bytes_fetched": "\(c.bytes)", "image_cache_hits": "\(c.hits)",
            "image_cache_misses": "\(c.misses)", "image_retries": "\(c.retries)"]
}

func summaryMeta(_ p: ServedProcess, _ s: ServeSummary) -> Logger.Metadata {
    func us(_ v: UInt64?) -> Logger.MetadataValue { .string(v.map { String(format: "%.1f", Double($0) / 1000) } ?? "-") }
    var m = peerMeta(p.peer)
    m["vm"] = "\(p.id)"
    m["faults"] = "\(s.faults)"
    m["bytes"] = "\(s.bytes)"
    m["first_fault_us"] = us(s.timeToFirstFaultNs)
    m["p50_us"] = us(s.p50Ns)
    m["p99_us"] = us(s.p99Ns)
    m["removes"] = "\(s.removeEvents)"
    m["removed_bytes"] = "\(s.removedBytes)"
    m["retries"] = "\(s.retries)"
    if let pf = p.prefetchStats() {
        m["prefetched_pages"] = "\(pf.prefetchedPages)"
        m["prefetch_planned_pages"] = "\(pf.plannedPages)"
        m["prefetch_already_present_pages"] = "\(pf.alreadyPresentPages)"
        m["prefetch_skipped_pages"] = "\(pf.skippedPages)"
        m["prefetch_faults_avoided"] = "\(pf.faultsAvoided ?? 0)"
        m["prefetch_late_faults"] = "\(pf.faultsOnPrefetchedPages ?? 0)"
        m["prefetched_bytes"] = "\(pf.prefetchedBytes)"
        // A guest's reads of a present page never reach the handler: which prefetched pages it
        // used is unknown to a server, so these two say so ("-") rather than guess.
        m["prefetched_and_used_pages"] = .string(pf.usedPages.map { "\($0)" } ?? "-")
        m["prefetch_wasted_bytes"] = .string(pf.wastedBytes.map { "\($0)" } ?? "-")
        m["prefetch_deferred_chunks"] = "\(pf.deferredChunks)"
        m["prefetch_faults_joined"] = "\(pf.faultsJoined)"
        m["prefetch_chunks_taken_by_faults"] = "\(pf.chunksTakenByFaults)"
        m["prefetch_dropped_fetches"] = "\(pf.droppedFetches)"
        m["prefetch_extra_pages"] = "\(pf.extraPages)"
        // Every page the filler installed (recorded + extra): faults avoided counts over these.
        m["prefetch_installed_pages"] = "\(pf.prefetchedPages + pf.extraPages)"
        m["prefetch_source_errors"] = "\(pf.sourceErrors)"
        m["prefetch_seconds"] = .string(String(format: "%.3f", pf.seconds))
        m["prefetch_ending"] = .string(pf.ending?.description ?? "running")
        m["prefetch_last_page_ms"] = .string(pf.timeToLastPage.map { String(format: "%.1f", $0 * 1000) } ?? "-")
    }
    m["fallbacks"] = "\(s.fallbacks)"
    m["failures"] = "\(s.failures)"
    m["served_s"] = .string(String(format: "%.3f", Double(s.servedNs) / 1e9))
    // Huge-page coverage of the guest memory (PAGEMAP_SCAN of the peer's pagemap): measured
    // for `VM stats`; in `VM gone` the last measured while the VM ran, and how long before.
    m["huge_page_bytes"] = .string(s.hugePageCoverage.map { "\($0.hugePageBytes)" } ?? "-")
    m["huge_page_of_bytes"] = .string(s.hugePageCoverage.map { "\($0.bytes)" } ?? "-")
    m["huge_page_measured_s_ago"] = .string(s.hugePageCoverageAgeNs.map { String(format: "%.3f", Double($0) / 1e9) } ?? "-")
    return m
}

extension ServeCommand.Image {
    /// The source's length (the unpacked size for a packed snapshot).
    func withLength() -> Self {
        var c = self
        c.length = source?.length ?? length
        return c
    }
}
