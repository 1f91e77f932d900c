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
            A bad hand-off is logged and its connection closed; the others go on. When a served \
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
            file missing, unreadable or empty; with --once: the hand-off was refused).
            """
    )

    @Option(help: ArgumentHelp("The Unix socket to listen on (Firecracker's mem_backend.backend_path).", valueName: "path"))
    var socket: String

    @Option(name: .customLong("memory-file"), help: ArgumentHelp("The snapshot's memory file (mem_file_path).", valueName: "file"))
    var memoryFile: String

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

    @Option(help: ArgumentHelp("How pages are read: mmap (the file mapped read-only; UFFDIO_COPY copies straight from the page cache) or pread (a read per fault into a buffer, then the copy: two copies).", valueName: "mmap|pread"))
    var source: String = "mmap"

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
        // A worker or a re-executed supervisor serves the file the first process opened (the
        // path may name a new snapshot by now); only the first process opens --memory-file.
        if let workerState {
            let st = try WorkerState.read(fd: workerState)
            try runWorker(inherited: st, memFD: st.memoryFD, memLength: try fileLength(st.memoryFD))
        } else if let supervisorState {
            let st = try WorkerState.read(fd: supervisorState)
            try runSupervisor(inherited: st, memFD: st.memoryFD)
        } else {
            let (memFD, memLength) = try openMemoryFile(memoryFile)
            if noSupervisor {
                try runWorker(inherited: nil, memFD: memFD, memLength: memLength)
            } else {
                try runSupervisor(inherited: nil, memFD: memFD)
            }
        }
    }

    /// Option checks (not ArgumentParser's validate(): its errors are not CLIError lines).
    func check() throws(CLIError) {
        guard readers >= 1, readers <= 64 else { throw .usage("--readers must be 1...64 (got \(readers))") }
        _ = try cpus()
        _ = try mode()
        _ = try serveOptions()
        guard source == "mmap" || source == "pread" else { throw .usage("--source '\(source)': use mmap or pread") }
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

    func runWorker(inherited: WorkerState?, memFD: Int32, memLength: Int) throws {
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
        var config = SnapshotServer.Configuration(memoryFile: memFD, memoryFileLength: memLength)
        config.serve = try serveOptions()
        if source == "mmap" {
            do { config.serve.memoryFileMapping = try MemoryFileMapping(fd: memFD, length: memLength) } catch {
                throw CLIError.failed("--source mmap: \(error)")
            }
        }
        config.receiveTimeoutMilliseconds = receiveTimeout
        config.allowedUIDs = allowUID.isEmpty ? nil : Set(allowUID)
        config.once = once
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
            case .gone(let p, let s):
                log.info("VM gone", metadata: summaryMeta(p, s))
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
        log.info(inherited?.vms.isEmpty == false ? "worker serving after restart" : "listening",
                 metadata: ["socket": .string(socket), "memory_file": .string(memoryFile), "memory_bytes": "\(memLength)",
                            "worker_pid": "\(getpid())"])
        for sig in [SIGINT, SIGTERM] { signal(sig, SIG_IGN) }
        let sources = [SIGINT, SIGTERM].map { sig -> DispatchSourceSignal in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { server.stop() }
            s.resume()
            return s
        }
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

func peerMeta(_ peer: PeerCredentials?) -> Logger.Metadata {
    guard let peer else { return [:] }
    return ["peer_pid": "\(peer.pid)", "peer_uid": "\(peer.uid)", "peer_gid": "\(peer.gid)"]
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
    m["fallbacks"] = "\(s.fallbacks)"
    m["failures"] = "\(s.failures)"
    m["served_s"] = .string(String(format: "%.3f", Double(s.servedNs) / 1e9))
    return m
}
