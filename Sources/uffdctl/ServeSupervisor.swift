import ArgumentParser
import Dispatch
import Foundation
import Logging
import Synchronization
import UffdKit

/// What a worker or a re-executed supervisor inherits: fd numbers valid in the new process
/// and what each served VM is. Written to an unlinked temporary file whose fd is passed.
struct WorkerState: Codable {
    struct VM: Codable {
        var id: Int
        var uffdFD: Int32
        var connectionFD: Int32
        var regions: [GuestRegion]
        var peer: PeerCredentials
        var peerStartTime: UInt64?
    }
    var listenFD: Int32
    var controlFD: Int32
    /// The memory file opened by the first process (served across every restart); -1 for a URL.
    var memoryFD: Int32
    /// A URL's ETag when the first process opened it (each worker reopens the URL and refuses
    /// to serve a replaced object); nil for files.
    var etag: String? = nil
    var executable: String
    var vms: [VM]

    /// Reads the state from an inherited fd (and closes it).
    static func read(fd: Int32) throws(CLIError) -> WorkerState {
        defer { close(fd) }
        var data = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        var off: off_t = 0
        while true {
            let n = pread(fd, &buf, buf.count, off)
            if n <= 0 { break }
            data.append(contentsOf: buf[0..<n])
            off += off_t(n)
        }
        do { return try JSONDecoder().decode(WorkerState.self, from: data) } catch {
            throw .usage("inherited serve state on fd \(fd) is unreadable: \(error)")
        }
    }

    /// Writes the state to an unlinked temporary file; returns its fd (close-on-exec cleared).
    func write() throws(CLIError) -> Int32 {
        var template = Array("/tmp/uffdctl-serve-state-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw .failed("cannot create the state file for the worker: \(errnoName(errno))") }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        let data = (try? JSONEncoder().encode(self)) ?? Data()
        let ok = data.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) == $0.count }
        guard ok else { close(fd); throw .failed("cannot write the state file for the worker: \(errnoName(errno))") }
        return fd
    }

    /// Worker → supervisor: a VM is served; the supervisor keeps duplicates of its uffd and
    /// connection (sent as fds) so a new worker can adopt them.
    static func announce(_ p: ServedProcess, over control: Int32) {
        let vm = VM(id: p.id, uffdFD: -1, connectionFD: -1, regions: p.regions, peer: p.peer, peerStartTime: p.peerStartTime)
        guard let body = try? JSONEncoder().encode(Message(op: "serving", vm: vm, id: p.id)) else { return }
        try? Handoff.send(fds: [p.uffd.fd, p.connection], body: Array(body), over: control)
    }

    /// Worker → supervisor: a VM is gone; the supervisor closes its duplicates.
    static func announceGone(_ id: Int, over control: Int32) {
        guard let body = try? JSONEncoder().encode(Message(op: "gone", vm: nil, id: id)) else { return }
        try? Handoff.send(fds: [], body: Array(body), over: control)
    }

    struct Message: Codable {
        var op: String
        var vm: VM?
        var id: Int
    }
}

/// Signals noted by DispatchSource handlers, read by the supervisor's loop.
private let hupReceived = Atomic<Bool>(false)
private let termReceived = Atomic<Bool>(false)

extension ServeCommand {
    /// The supervisor: holds the listening socket and duplicates of every served uffd, runs
    /// one worker at a time, restarts it when it dies, re-executes itself on SIGHUP.
    func runSupervisor(inherited: WorkerState?, memFD: Int32, etag: String?) throws {
        let log = makeServeLogger(json: json, label: "uffdctl serve")
        var vms: [Int: WorkerState.VM] = [:]
        let listenFD: Int32
        var executable: String
        if let st = inherited {
            listenFD = st.listenFD
            executable = st.executable
            for vm in st.vms { vms[vm.id] = vm }
            for fd in [listenFD, memFD] + st.vms.flatMap({ [$0.uffdFD, $0.connectionFD] }) { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            log.info("supervisor re-executed", metadata: ["supervisor_pid": "\(getpid())", "vms": "\(vms.count)"])
        } else {
            let m = try mode()
            do throws(HandoffError) { listenFD = try HandoffListener(path: socket, mode: m).fd } catch {
                throw CLIError.failed("--socket \(socket): \(error.message)")
            }
            executable = selfExecutable()
        }
        if let pidFile { try? "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8) }
        for sig in [SIGINT, SIGTERM, SIGHUP] { signal(sig, SIG_IGN) }
        let sources = [SIGINT, SIGTERM, SIGHUP].map { sig -> DispatchSourceSignal in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                if sig == SIGHUP { hupReceived.store(true, ordering: .releasing) } else { termReceived.store(true, ordering: .releasing) }
            }
            s.resume()
            return s
        }
        defer { sources.forEach { $0.cancel() } }
        let baseArgs = workerArguments()
        var quickDeaths = 0

        while true {
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                throw CLIError.failed("socketpair: \(errnoName(errno))")
            }
            let state = WorkerState(listenFD: listenFD, controlFD: pair[1], memoryFD: memFD, etag: etag, executable: executable, vms: Array(vms.values))
            let stateFD = try state.write()
            let inheritedFDs = [listenFD, pair[1], memFD, stateFD] + state.vms.flatMap { [$0.uffdFD, $0.connectionFD] }
            let pid = try spawn(executable, baseArgs + ["--worker-state", "\(stateFD)"], keeping: inheritedFDs)
            close(stateFD)
            close(pair[1])
            let control = pair[0]
            let startedAt = Date()
            log.info("worker started", metadata: ["worker_pid": "\(pid)", "supervisor_pid": "\(getpid())", "vms": "\(vms.count)"])
            if let workerPidFile { try? "\(pid)\n".write(toFile: workerPidFile, atomically: true, encoding: .utf8) }

            var status: Int32 = 0
            var exited = false
            var stopping = false
            var reexec = false
            while !exited {
                var p = pollfd(fd: control, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, 100)
                drainControl(control, &vms)
                if termReceived.load(ordering: .acquiring) && !stopping {
                    stopping = true
                    kill(pid, SIGTERM)
                }
                if hupReceived.exchange(false, ordering: .acquiringAndReleasing) && !stopping && !reexec {
                    log.info("SIGHUP: restarting (worker stops, supervisor re-executes with every uffd inherited)")
                    reexec = true
                    kill(pid, SIGTERM)
                }
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid { exited = true }
            }
            drainControl(control, &vms)
            close(control)
            let signaled = status & 0x7f != 0 && status & 0x7f != 0x7f
            let code = signaled ? Int32(-1) : (status >> 8) & 0xff
            if stopping || termReceived.load(ordering: .acquiring) {
                log.info("stopped", metadata: ["vms_left": "\(vms.count)"])
                unlink(socket)
                return
            }
            if reexec {
                let st = WorkerState(listenFD: listenFD, controlFD: -1, memoryFD: memFD, etag: etag, executable: executable, vms: Array(vms.values))
                let fd = try st.write()
                for f in [listenFD, memFD] + st.vms.flatMap({ [$0.uffdFD, $0.connectionFD] }) { _ = fcntl(f, F_SETFD, 0) }
                let args = [executable] + baseArgs + ["--supervisor-state", "\(fd)"]
                var cargs = args.map { strdup($0) } + [nil]
                execv(executable, &cargs)
                log.error("re-exec failed; continuing with this supervisor", metadata: ["error": "\(errnoName(errno))"])
                close(fd)
                continue
            }
            if once && !signaled {
                throw ExitCode(code)
            }
            if !signaled && code == CLIExit.usage.rawValue && vms.isEmpty {
                // The worker refused to start (bad input): restarting would fail the same way.
                throw ExitCode(code)
            }
            // A worker that keeps dying at once (e.g. the socket or the file became unusable)
            // is not restarted forever.
            quickDeaths = Date().timeIntervalSince(startedAt) < 2 ? quickDeaths + 1 : 0
            if quickDeaths >= 5 {
                log.error("the worker died 5 times within 2 s of its start; giving up",
                          metadata: ["vms": "\(vms.count)", "exit_code": "\(code)"])
                throw ExitCode(CLIExit.failed.rawValue)
            }
            log.warning("worker died; starting a new one that adopts every served VM",
                        metadata: ["worker_pid": "\(pid)", signaled ? "signal" : "exit_code": "\(signaled ? status & 0x7f : code)",
                                   "vms": "\(vms.count)"])
            usleep(50_000)
        }
    }

    /// Reads the worker's announcements: keeps the fds of served VMs, closes those of gone ones.
    private func drainControl(_ control: Int32, _ vms: inout [Int: WorkerState.VM]) {
        while let (bytes, fds) = try? Handoff.receiveMessage(on: control, maxBytes: 1 << 20) {
            if bytes.isEmpty && fds.isEmpty { return }
            guard let m = try? JSONDecoder().decode(WorkerState.Message.self, from: Data(bytes)) else {
                fds.forEach { _ = close($0) }
                continue
            }
            if m.op == "serving", var vm = m.vm, fds.count == 2 {
                vm.uffdFD = fds[0]
                vm.connectionFD = fds[1]
                if let old = vms[vm.id] { close(old.uffdFD); close(old.connectionFD) }
                vms[vm.id] = vm
            } else {
                fds.forEach { _ = close($0) }
                if m.op == "gone", let old = vms.removeValue(forKey: m.id) {
                    close(old.uffdFD)
                    close(old.connectionFD)
                }
            }
        }
    }

    /// This invocation's arguments for a worker / re-exec (without internal state options).
    private func workerArguments() -> [String] {
        var out: [String] = []
        var skip = false
        for a in CommandLine.arguments.dropFirst() {
            if skip { skip = false; continue }
            if a == "--supervisor-state" || a == "--worker-state" { skip = true; continue }
            if a.hasPrefix("--supervisor-state=") || a.hasPrefix("--worker-state=") { continue }
            out.append(a)
        }
        return out
    }

    /// posix_spawn of `path` with `args`; `keeping` fds stay open in the child (dup2 onto
    /// themselves clears close-on-exec).
    private func spawn(_ path: String, _ args: [String], keeping: [Int32]) throws(CLIError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd in keeping where fd >= 0 { posix_spawn_file_actions_adddup2(&actions, fd, fd) }
        var cargs = ([path] + args).map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, &cargs, environ)
        guard rc == 0 else { throw .failed("cannot start the worker \(path): \(errnoName(rc))") }
        return pid
    }
}

/// The path of this executable (resolved now, so a re-exec after an upgrade runs the new file).
func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    if n > 0 { return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    return CommandLine.arguments[0]
}
