#!/usr/bin/env python3
"""UffdKit's real-Firecracker rig (Python 3 standard library only).

Boots the bare-metal guest (guest/guest.S) in Firecracker v1.12.1, snapshots it, writes a
command into the snapshot's memory file (the guest's mailbox page), restores it in a new
Firecracker with the Uffd memory backend pointing at `uffdctl serve` (or the File backend) and
checks that the restored guest verified every page it read and printed the expected checksum.

  fcrig.py e2e --case NAME --uffdctl PATH     one end-to-end case, one JSON object on stdout
  fcrig.py bench --uffdctl PATH [--runs N]    restore benchmark, File vs serve, interleaved
                  [--mode sequential|scattered] [--readahead SIZE]... [--serve-variant LABEL=ARGS]...
                  [--prefetch]  (a serve --prefetch row, recorded from one restore first)

As a module (issue 12's working-set benchmark reuses it): make_snapshot() boots and snapshots the
guest, write_mailbox(mem, mode=1, npages=8192) selects the fixed scattered 32 MiB working set of
the 128 MiB region, Serve() starts `uffdctl serve --json` (events("VM gone") are its summaries),
restore() loads the snapshot in a new Firecracker and verdict() checks the guest's pass.

Exit codes: 0 passed, 1 failed (the JSON says what), 77 skipped (the JSON's "skip" says why:
no /dev/kvm, no Firecracker binary, no binutils, no huge pages).

  fcrig.py guest [--out DIR]                  only build the guest; prints the ELF's path
"""
import argparse
import errno
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Must match guest/guest.S.
REGION_BASE = 0x2000000
REGION_PAGES = 32768
MAILBOX = 0x1001000
GO_MAGIC = 0x5546464B49544F47
MULT = 0x9E3779B97F4A7C15
SEED = 0x5EED0F1CA7C0FFEE
MASK = (1 << 64) - 1
MEM_MIB = 160                     # the region ends at 160 MiB
SCATTER_STRIDE = 0x2F0F           # odd: i -> i*stride mod 32768 is a bijection


class Skip(Exception):
    pass


class Failure(Exception):
    pass


def log(*a):
    print("fcrig:", *a, file=sys.stderr, flush=True)


def H(addr):
    return ((addr ^ SEED) * MULT) & MASK


def page_address(i, mode, stride):
    idx = i if mode == 0 else i * stride
    return REGION_BASE + ((idx & (REGION_PAGES - 1)) << 12)


def expected_sum(npages, mode, stride):
    s = 0
    for i in range(npages):
        s = (s + H(page_address(i, mode, stride))) & MASK
    return s


# --- what the rig needs from the machine -------------------------------------------------------

def need_kvm():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        raise Skip(f"/dev/kvm cannot be opened ({e.strerror}): Firecracker needs KVM")


def firecracker_binary():
    env = os.environ.get("UFFDKIT_FIRECRACKER")
    if env:
        if not os.access(env, os.X_OK):
            raise Skip(f"UFFDKIT_FIRECRACKER={env} is not executable")
        return env
    r = subprocess.run([os.path.join(HERE, "fetch-firecracker.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise Skip((r.stderr.strip().splitlines() or ["fetch-firecracker.sh failed"])[-1])
    return r.stdout.strip()


def build_guest(outdir):
    """Assembles and links the guest with the system binutils; returns the ELF's path."""
    src = os.path.join(HERE, "guest", "guest.S")
    lds = os.path.join(HERE, "guest", "guest.ld")
    obj = os.path.join(outdir, "guest.o")
    elf = os.path.join(outdir, "guest.elf")
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise Skip(f"`{tool}` not found: install binutils to build the test guest")
    for cmd in (["as", "--64", "-o", obj, src],
                ["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-T", lds, "-o", elf, obj]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return elf


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class HugePages:
    """Leases `count` 2 MiB huge pages: adds them to nr_hugepages beside other test runs' leases and
    gives exactly those back. The change is made under the lock the Swift tests take
    (Tests/CUffdTestSupport/ct_hugetlb_pool.c), so concurrent runs never undo each other."""
    PATH = "/proc/sys/vm/nr_hugepages"
    LOCKS = ("/run/lock/uffdkit-hugetlb.lock", "/tmp/uffdkit-hugetlb.lock")

    def __init__(self, count):
        self.count = count
        self.added = 0

    @staticmethod
    def free():
        """Free huge pages nobody has reserved."""
        return meminfo("HugePages_Free") - meminfo("HugePages_Rsvd")

    @classmethod
    def _adjust(cls, delta):
        """Adds delta under the lock; returns what the pool really changed by."""
        for path in cls.LOCKS:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                break
            except OSError:
                continue
        else:
            raise OSError(errno.EACCES, "cannot open a hugetlb lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with open(cls.PATH) as f:
                old = int(f.read())
            with open(cls.PATH, "w") as f:
                f.write(str(max(old + delta, 0)))
            with open(cls.PATH) as f:
                return int(f.read()) - old
        finally:
            os.close(fd)

    def __enter__(self):
        try:
            self.added = self._adjust(self.count)
        except OSError as e:
            raise Skip(f"cannot reserve {self.count} huge pages through {self.PATH} ({e.strerror}; needs root)")
        if self.free() < self.count:
            got = self.free()
            self.__exit__(None, None, None)
            raise Skip(f"only {got} of {self.count} 2 MiB huge pages could be reserved (memory fragmented?)")
        return self

    def __exit__(self, *exc):
        cleanup_children()     # pages still mapped by a Firecracker would stay reserved
        if self.added:
            try:
                self._adjust(-self.added)
            except OSError as e:
                log(f"could not give back {self.added} huge pages: {e}")
            self.added = 0


# --- processes ----------------------------------------------------------------------------------

CHILDREN = []
_LIBC = None


def die_with_parent():
    """Runs in the child before exec: SIGKILL when the rig dies, even by SIGKILL (no stray VMs).
    The signal follows the thread that forked, so children are started from the main thread or
    killed before their thread ends."""
    global _LIBC
    import ctypes
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def cleanup_children():
    for p in CHILDREN:
        # serve runs in its own process group: its worker must go too, not only the supervisor.
        if getattr(p, "uffdkit_group", False) and group_alive(p.pid):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in CHILDREN:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class Lines:
    """Collects a child's output lines with their arrival time (time.monotonic())."""

    def __init__(self, stream):
        self.lines = []
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, predicate, timeout, start=0):
        """The first (time, line, index) at index >= start whose line satisfies predicate."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if predicate(line):
                        return t, line, i
                    i += 1
                if self.closed:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def text(self):
        with self.cond:
            return "\n".join(l for _, l in self.lines)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def taskset(cpu):
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


class Firecracker:
    """One Firecracker process driven over its API socket; its stdout is the guest's serial."""

    def __init__(self, binary, workdir, name, cpu=None):
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.api")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        # Firecracker's own log goes to a file: on stdout its lines could split the guest's.
        self.logfile = os.path.join(workdir, f"{name}.log")
        open(self.logfile, "w").close()
        self.proc = subprocess.Popen(taskset(cpu) + [binary, "--api-sock", self.sock, "--level", "Warning",
                                                     "--log-path", self.logfile],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        CHILDREN.append(self.proc)
        self.out = Lines(self.proc.stdout)
        # The socket's path exists from bind(); requests work from listen(): connect to know.
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(self.sock)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise Failure(f"{name}: Firecracker did not open its API socket: {self.out.text()[-2000:]}; "
                                  f"log: {self.log_text()}")
                time.sleep(0.005)

    def api(self, method, path, body, timeout=30):
        c = UnixHTTP(self.sock, timeout)
        try:
            c.request(method, path, json.dumps(body), {"Content-Type": "application/json", "Accept": "application/json"})
            r = c.getresponse()
            data = r.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as e:
            raise Failure(f"{self.name}: {method} {path} failed: {e!r}; output: {self.out.text()[-2000:]}; log: {self.log_text()}")
        finally:
            c.close()
        if r.status >= 300:
            raise Failure(f"{self.name}: {method} {path} -> {r.status} {data}; log: {self.log_text()}")
        return data

    def wait_guest(self, token, timeout, start=0):
        """The first guest line "UFG <token>..." as (time, line from "UFG", index)."""
        hit = self.out.wait(lambda l: ("UFG " + token) in l, timeout, start)
        return None if hit is None else (hit[0], hit[1][hit[1].index("UFG "):], hit[2])

    def wait_guest_progress(self, page, timeout):
        """The first progress line "UFG P <i>" with i >= page."""
        def reached(l):
            if "UFG P " not in l:
                return False
            try:
                return int(l[l.index("UFG P "):].split()[2], 16) >= page
            except (IndexError, ValueError):
                return False
        hit = self.out.wait(reached, timeout)
        return None if hit is None else (hit[0], hit[1][hit[1].index("UFG "):], hit[2])

    def log_text(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def make_snapshot(binary, guest, workdir, huge, cpu=None):
    """Boots the guest, lets it fill its region, pauses and snapshots it. Returns (state, mem)."""
    fc = Firecracker(binary, workdir, "boot", cpu)
    try:
        fc.api("PUT", "/boot-source", {"kernel_image_path": guest, "boot_args": "console=ttyS0"})
        cfg = {"vcpu_count": 1, "mem_size_mib": MEM_MIB}
        if huge:
            cfg["huge_pages"] = "2M"
        fc.api("PUT", "/machine-config", cfg)
        fc.api("PUT", "/actions", {"action_type": "InstanceStart"})
        if fc.wait_guest("READY", 60) is None:
            raise Failure(f"the guest did not boot and fill its memory: {fc.out.text()[-2000:]}; log: {fc.log_text()}")
        fc.api("PATCH", "/vm", {"state": "Paused"})
        state = os.path.join(workdir, "vm.state")
        mem = os.path.join(workdir, "vm.mem")
        fc.api("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem},
               timeout=120)
    finally:
        fc.kill()
    return state, mem


def write_mailbox(mem, mode, npages, stride=SCATTER_STRIDE, delay=0, progress=0, passes=1):
    """The restored guest's command: the mailbox page at guest-physical MAILBOX == file offset."""
    with open(mem, "r+b") as f:
        f.seek(MAILBOX)
        f.write(struct.pack("<7Q", GO_MAGIC, mode, npages, stride, delay, progress, passes))


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


class Serve:
    """`uffdctl serve --json` on a Unix socket; its log lines are collected and parsed."""

    def __init__(self, uffdctl, workdir, mem, name="serve", extra=(), cpu=None):
        self.sock = os.path.join(workdir, f"{name}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.args = (taskset(cpu) + [uffdctl, "serve", "--socket", self.sock, "--memory-file", mem, "--json"]
                     + list(extra))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent, start_new_session=True)
        self.proc.uffdkit_group = True
        CHILDREN.append(self.proc)
        self.out = Lines(self.proc.stdout)
        if self.wait_event("listening", 30) is None:
            self.proc.kill()
            raise Failure(f"uffdctl serve did not start listening on {self.sock} (exit {self.proc.wait()}): "
                          f"{self.out.text()[-2000:]}")

    @staticmethod
    def _parse(line):
        try:
            obj = json.loads(line)
            return obj if isinstance(obj, dict) else None
        except ValueError:
            return None

    def events(self, msg):
        """Every JSON log line whose msg is `msg`, in order."""
        with self.out.cond:
            lines = [l for _, l in self.out.lines]
        return [o for o in map(self._parse, lines) if o is not None and o.get("msg") == msg]

    def wait_event(self, msg, timeout, count=1):
        """Waits until `count` log lines with this msg were seen; returns the last, or None."""
        def enough(_):
            return len(self.events(msg)) >= count
        if self.out.wait(enough, timeout) is None:
            return None
        return self.events(msg)[count - 1]

    def stop(self):
        """SIGTERM; serve must exit within 10 s and leave no process (worker) behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise Failure(f"uffdctl serve did not exit within 10 s of SIGTERM: {self.out.text()[-2000:]}")
        deadline = time.monotonic() + 5
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise Failure(f"uffdctl serve exited but left processes running (its worker?): {self.out.text()[-2000:]}")
        return self.proc.returncode


def served_cleanly(srv, vms, min_faults, timeout=10):
    """serve's summaries of `vms` VMs that went away: no fault got the fallback, none failed."""
    if srv.wait_event("VM gone", timeout, vms) is None:
        raise Failure(f"serve logged {len(srv.events('VM gone'))} of {vms} 'VM gone' summaries: {srv.out.text()[-2000:]}")
    gone = srv.events("VM gone")
    for g in gone:
        if g.get("fallbacks") != 0 or g.get("failures") != 0 or int(g.get("faults", 0)) < min_faults:
            raise Failure(f"serve's summary shows a problem (want >= {min_faults} faults, no fallback/failure): {g}")
    return [{k: g.get(k) for k in ("faults", "bytes", "fallbacks", "failures", "first_fault_us", "p50_us", "p99_us",
                                   "huge_page_bytes", "huge_page_of_bytes", "huge_page_measured_s_ago")}
            for g in gone]


def restore(binary, workdir, name, state, mem_backend, cpu=None):
    """A new Firecracker restores the snapshot; returns (fc, t_before_load, t_after_load)."""
    fc = Firecracker(binary, workdir, name, cpu)
    t0 = time.monotonic()
    fc.api("PUT", "/snapshot/load", {"snapshot_path": state, "mem_backend": mem_backend, "resume_vm": True},
           timeout=30)
    return fc, t0, time.monotonic()


def verdict(fc, t0, timeout, npages, mode, stride=SCATTER_STRIDE):
    """Waits for the guest's result line and checks it: every page read verified, the sum right."""
    hit = fc.out.wait(lambda l: "UFG OK" in l or "UFG BAD" in l, timeout)
    go = fc.wait_guest("GO", 0)
    if hit is None:
        raise Failure(f"{fc.name}: no result from the restored guest within {timeout} s; output: {fc.out.text()[-2000:]}; log: {fc.log_text()}")
    t, line, _ = hit
    parts = line[line.index("UFG "):].split()
    if parts[1] == "BAD":
        raise Failure(f"{fc.name}: the restored guest found {int(parts[2], 16)} bad pages, the first at "
                      f"{int(parts[3], 16):#x}")
    pages, total = int(parts[2], 16), int(parts[3], 16)
    want = expected_sum(npages, mode, stride)
    if pages != npages or total != want:
        raise Failure(f"{fc.name}: guest read {pages} pages with sum {total:#x}, expected {npages} pages, sum {want:#x}")
    return {"vm": fc.name, "pages": pages, "sum": f"{total:#x}",
            "to_go_ms": round((go[0] - t0) * 1000, 2) if go else None,
            "to_verified_ms": round((t - t0) * 1000, 2)}


# --- end-to-end cases ---------------------------------------------------------------------------

def case_basic(ctx, huge):
    npages = 8192
    with (HugePages(2 * MEM_MIB // 2) if huge else NullCtx()):
        state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, huge)
        write_mailbox(mem, 0, npages)
        srv = Serve(ctx.uffdctl, ctx.work, mem, extra=["--stats-interval", "0.2"])
        fc, t0, t1 = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": srv.sock})
        res = verdict(fc, t0, 120, npages, 0)
        res["load_ms"] = round((t1 - t0) * 1000, 2)
        # The restored guest's memory really is hugetlb: the 32 MiB it read is in huge pages
        # (allocated on fault; the boot VM is gone by now).
        in_use = meminfo("HugePages_Total") - meminfo("HugePages_Free")
        if huge and in_use < npages * 4096 // (2 << 20):
            raise Failure(f"only {in_use} huge pages in use after the 2M guest read 32 MiB")
        res["huge_pages_in_use"] = in_use
        # One `VM stats` line after the guest verified its pages: serve measured the huge-page
        # coverage of the running VM, and `VM gone` reports that last value (issue 14).
        if srv.wait_event("VM stats", 10, len(srv.events("VM stats")) + 1) is None:
            raise Failure(f"serve logged no 'VM stats' line within 10 s (--stats-interval 0.2): {srv.out.text()[-2000:]}")
        fc.kill()
        served = served_cleanly(srv, 1, 16 if huge else npages)
        code = srv.stop()
        return {"page_size": "2M" if huge else "4K", "vms": [res], "served": served, "serve_exit": code}


class NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def case_readahead(ctx):
    """serve --readahead 64K: pages installed ahead of the faults must hold the right bytes too.
    The guest reads all 32768 pages of its region in the scattered order, so every page a
    window brought in is checked when the guest gets to it."""
    npages = REGION_PAGES
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages)
    srv = Serve(ctx.uffdctl, ctx.work, mem, extra=["--readahead", "64K"])
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    res = verdict(fc, t0, 180, npages, 1)
    fc.kill()
    served = served_cleanly(srv, 1, 1)
    code = srv.stop()
    # Windows of 16 pages: far fewer faults than pages, else readahead did not happen.
    if int(served[0]["faults"]) > npages // 2:
        raise Failure(f"{served[0]['faults']} faults for {npages} pages: the 64K windows did not install ahead")
    return {"vms": [res], "served": served, "serve_exit": code}


def case_several(ctx, count=3, huge=False):
    """Several VMs restored at once from one server, each reading the same scattered 16 MiB."""
    if huge:
        with HugePages((count + 1) * MEM_MIB // 2):
            return _several(ctx, count, True)
    return _several(ctx, count, False)


def _several(ctx, count, huge):
    npages = 4096
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, huge)
    write_mailbox(mem, 1, npages)
    srv = Serve(ctx.uffdctl, ctx.work, mem)
    results, errors = [None] * count, []

    def one(i):
        try:
            fc, t0, _ = restore(ctx.fc, ctx.work, f"vm{i}", state, {"backend_type": "Uffd", "backend_path": srv.sock})
            results[i] = verdict(fc, t0, 180, npages, 1)
            fc.kill()
        except Exception as e:      # reported below; one VM's failure must not hide the others'
            errors.append(f"vm{i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alive = srv.proc.poll() is None
    if errors:
        raise Failure("; ".join(errors) + f"; serve log: {srv.out.text()[-3000:]}")
    served = served_cleanly(srv, count, 8 if huge else npages)
    code = srv.stop()
    return {"page_size": "2M" if huge else "4K", "vms": results, "served": served, "serve_alive_after": alive,
            "serve_exit": code}


def case_restart(ctx, how):
    """The guest reads the whole 128 MiB region slowly in scattered order; while it is faulting,
    the server is restarted by SIGHUP (at 1/4 and 1/2 of the pass) or its worker is killed with
    SIGKILL (at 1/4, 1/2 and 3/4). Each time a new worker must take over, and the guest must go on
    and verify every page."""
    npages = REGION_PAGES
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages, delay=25, progress=0xFFF)
    srv = Serve(ctx.uffdctl, ctx.work, mem, extra=["--worker-pid-file", os.path.join(ctx.work, "worker.pid")])
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    points = [npages // 4, npages // 2] if how == "sighup" else [npages // 4, npages // 2, 3 * npages // 4]
    restarts = []
    worker = worker_pid(ctx, srv)
    for point in points:
        hit = fc.wait_guest_progress(point, 120)
        if hit is None:
            raise Failure(f"the restored guest did not reach page {point}: {fc.out.text()[-2000:]}; log: {fc.log_text()}")
        t_restart, _, idx = hit
        if how == "sighup":
            target = srv.proc.pid      # the supervisor re-executes itself and starts a new worker
            srv.proc.send_signal(signal.SIGHUP)
        else:
            target = worker
            os.kill(target, signal.SIGKILL)
        new_worker = worker_pid(ctx, srv, other_than=worker)
        # The pass must still be faulting after the restart, else the case proves nothing.
        after = fc.wait_guest("P ", 60, idx + 1)
        if after is None or after[0] <= t_restart:
            raise Failure(f"the guest made no progress after restart at page {point}: {srv.out.text()[-2000:]}")
        restarts.append({"at_page": point, "signalled_pid": target, "worker_before": worker,
                         "worker_after": new_worker})
        worker = new_worker
    res = verdict(fc, t0, 180, npages, 1)
    fc.kill()
    alive = srv.proc.poll() is None
    served = served_cleanly(srv, 1, 1)
    code = srv.stop()
    return {"restart": how, "restarts": restarts, "served": served, "vms": [res], "serve_alive_after": alive,
            "serve_exit": code}


def case_restart_at_load(ctx):
    """Restores that arrive while the server restarts: the hand-off of one VM right after SIGHUP
    (the supervisor is re-executing) and of another right after `kill -9` of the worker (no
    worker yet). The listening socket lives on in the supervisor, so each connection waits in
    its backlog for the next worker; both guests verify 32 MiB."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages)
    srv = Serve(ctx.uffdctl, ctx.work, mem, extra=["--worker-pid-file", os.path.join(ctx.work, "worker.pid")])
    results, restarts = [], []
    worker = worker_pid(ctx, srv)
    for how in ("sighup", "kill9"):
        if how == "sighup":
            srv.proc.send_signal(signal.SIGHUP)
        else:
            os.kill(worker, signal.SIGKILL)
        fc, t0, _ = restore(ctx.fc, ctx.work, f"vm-{how}", state, {"backend_type": "Uffd", "backend_path": srv.sock})
        results.append(verdict(fc, t0, 120, npages, 1))
        fc.kill()
        new_worker = worker_pid(ctx, srv, other_than=worker)
        restarts.append({"restart": how, "worker_before": worker, "worker_after": new_worker})
        worker = new_worker
    # Summaries count from the last restart: no minimum of faults, but no fallback, no failure.
    served = served_cleanly(srv, 2, 0, timeout=20)
    alive = srv.proc.poll() is None
    code = srv.stop()
    return {"vms": results, "restarts": restarts, "served": served, "serve_alive_after": alive, "serve_exit": code}


def worker_pid(ctx, srv, other_than=None):
    """The pid of serve's worker (the process that resolves faults), from its --worker-pid-file;
    with other_than, a worker that replaced that one (a re-executed debug build can take seconds
    to start on this loaded machine)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(ctx.work, "worker.pid")) as f:
                text = f.read().split()
            if text and int(text[-1]) != other_than:
                return int(text[-1])
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise Failure(f"no {'new ' if other_than else ''}worker pid in --worker-pid-file "
                  f"(other than {other_than}): {srv.out.text()[-3000:]}")


def case_once(ctx):
    """`serve --once`: serves one restored VM and exits 0 when that VM goes away cleanly."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages)
    srv = Serve(ctx.uffdctl, ctx.work, mem, extra=["--once"])
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    res = verdict(fc, t0, 120, npages, 1)
    if srv.proc.poll() is not None:
        raise Failure(f"serve --once exited ({srv.proc.returncode}) while its VM was still running")
    fc.kill()
    try:
        code = srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise Failure("serve --once did not exit after its VM went away")
    served = served_cleanly(srv, 1, npages, timeout=0)
    return {"vms": [res], "served": served, "serve_exit": code}


def case_prefetch(ctx):
    """Issue 12: a restore recorded once (`serve --record-working-set`), then a second restore of
    the same snapshot served with `--prefetch` of that recording: the guest verifies every page it
    reads, the filler installed the working set, and (nearly) no fault is left for the handler."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages)
    ws = os.path.join(ctx.work, "vm.ws")
    rec = Serve(ctx.uffdctl, ctx.work, mem, name="record", extra=["--once", "--record-working-set", ws])
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": rec.sock})
    first = verdict(fc, t0, 120, npages, 1)
    fc.kill()
    if rec.wait_event("working set recorded", 20) is None:
        raise Failure(f"serve did not record the working set: {rec.out.text()[-2000:]}")
    recorded = int(rec.events("working set recorded")[0]["pages"])
    if recorded < npages:
        raise Failure(f"the recording has {recorded} pages, the guest read {npages}")
    rec.stop()
    srv = Serve(ctx.uffdctl, ctx.work, mem, name="prefetch", extra=["--once", "--prefetch", ws])
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm1", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    second = verdict(fc, t0, 120, npages, 1)
    fc.kill()
    served = served_cleanly(srv, 1, 0)
    g = srv.events("VM gone")[0]
    installed = int(g["prefetched_pages"]) + int(g["prefetch_already_present_pages"])
    if int(g["prefetch_planned_pages"]) != recorded or installed != recorded or int(g["prefetch_skipped_pages"]) != 0:
        raise Failure(f"the prefetch did not install the recording ({recorded} pages): {g}")
    if int(g["faults"]) > npages // 2:
        raise Failure(f"the prefetch left most pages to faults: {g}")
    return {"vms": [first, second], "served": served, "recorded_pages": recorded,
            "prefetch": {k: g.get(k) for k in g if k.startswith("prefetch")} | {"faults": g.get("faults")}}


def case_vm_killed(ctx):
    """A VM killed in the middle of its restore (faults in flight) must not harm the server or
    the next VM: a second VM restored from the same server afterwards verifies every page."""
    npages = REGION_PAGES
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 1, npages, delay=25, progress=0xFFF)
    srv = Serve(ctx.uffdctl, ctx.work, mem)
    fc, t0, _ = restore(ctx.fc, ctx.work, "victim", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    if fc.wait_guest_progress(npages // 8, 120) is None:
        raise Failure(f"the first guest made no progress: {fc.out.text()[-500:]}")
    fc.kill()
    if srv.wait_event("VM gone", 20) is None:
        raise Failure(f"serve did not notice the killed VM: {srv.out.text()[-2000:]}")
    if srv.proc.poll() is not None:
        raise Failure(f"serve exited ({srv.proc.returncode}) after a VM was killed")
    fc2, t0, _ = restore(ctx.fc, ctx.work, "next", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    res = verdict(fc2, t0, 180, npages, 1)
    fc2.kill()
    if srv.wait_event("VM gone", 20, 2) is None:
        raise Failure(f"serve did not log the second VM's summary: {srv.out.text()[-2000:]}")
    first, second = srv.events("VM gone")[:2]
    if second.get("fallbacks") != 0 or second.get("failures") != 0:
        raise Failure(f"the second VM was not served cleanly: {second}")
    alive = srv.proc.poll() is None
    code = srv.stop()
    return {"vms": [res], "killed_vm_faults": first.get("faults"), "serve_alive_after": alive, "serve_exit": code}


def case_corrupt(ctx):
    """The check itself: one page of the memory file is damaged before a File-backend restore;
    the guest must report exactly that page (a rig that cannot fail proves nothing)."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 0, npages)
    victim = page_address(5000, 0, 1)
    with open(mem, "r+b") as f:
        f.seek(victim + 4088)
        f.write(b"\0" * 8)
    fc, t0, _ = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "File", "backend_path": mem})
    hit = fc.wait_guest("BAD", 60)
    ok = fc.wait_guest("OK", 0)
    fc.kill()
    if hit is None:
        raise Failure(f"the guest did not report the damaged page {victim:#x}: {fc.out.text()[-500:]}")
    parts = hit[1].split()
    bad, first = int(parts[2], 16), int(parts[3], 16)
    if bad != 1 or first != victim or ok is not None:
        raise Failure(f"the guest reported {bad} bad pages from {first:#x}, expected 1 at {victim:#x}")
    return {"bad_pages": bad, "first_bad": f"{first:#x}"}


def case_file(ctx):
    """The baseline the benchmark compares against: Firecracker's own File backend."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 0, npages)
    fc, t0, t1 = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "File", "backend_path": mem})
    res = verdict(fc, t0, 120, npages, 0)
    fc.kill()
    return {"vms": [res]}


def start_nginx(workdir, www):
    """nginx (Debian nginx-light) serving `www` with Range support on a free loopback port, in its
    own process group (killed with the rig). Returns (process, base URL)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise Skip("nginx not installed (make deps installs nginx-light)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = os.path.join(workdir, "nginx")
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    user = "user root;\n" if os.getuid() == 0 else ""
    conf = (f"{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log off; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; "
            f"fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp; "
            f"server {{ listen 127.0.0.1:{port}; root {www}; }} }}\n")
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(conf)
    proc = subprocess.Popen([nginx, "-c", os.path.join(d, "nginx.conf"), "-p", d], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
                            start_new_session=True)
    proc.uffdkit_group = True
    CHILDREN.append(proc)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise Skip(f"nginx did not start on port {port}")


class DelayProxy:
    """A TCP proxy on loopback in front of `upstream` (host, port) that holds every piece of a
    request `delay_ms` before forwarding it: each HTTP request (one segment on a keep-alive
    connection) pays the added latency once, as from a server that far away."""

    def __init__(self, upstream, delay_ms):
        self.upstream, self.delay = upstream, delay_ms / 1000.0
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, src, dst, delay):
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            for x in (c, u):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(c, u, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, 0), daemon=True).start()

    def close(self):
        self.lsock.close()


def case_http(ctx, packed):
    """The memory file behind an http:// URL (nginx), raw or packed: `serve --memory-file URL`
    fetches 2 MiB chunks on the deferred path; the guest verifies 32 MiB read in order."""
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, 0, npages)
    www = os.path.join(ctx.work, "www")
    os.makedirs(www, exist_ok=True)
    obj = os.path.join(www, "vm.mem")
    if packed:
        subprocess.run([ctx.uffdctl, "snapshot", "pack", mem, obj], check=True, stdout=subprocess.DEVNULL)
    else:
        shutil.copyfile(mem, obj)
    nginx, base = start_nginx(ctx.work, www)
    srv = Serve(ctx.uffdctl, ctx.work, f"{base}/vm.mem")
    fc, t0, t1 = restore(ctx.fc, ctx.work, "vm0", state, {"backend_type": "Uffd", "backend_path": srv.sock})
    res = verdict(fc, t0, 120, npages, 0)
    res["load_ms"] = round((t1 - t0) * 1000, 2)
    fc.kill()
    served = served_cleanly(srv, 1, 16)
    code = srv.stop()
    nginx.terminate()
    return {"page_size": "4K", "vms": [res], "served": served, "serve_exit": code, "packed": packed}


CASES = {
    "basic4k": lambda ctx: case_basic(ctx, False),
    "huge2m": lambda ctx: case_basic(ctx, True),
    "several": case_several,
    "several2m": lambda ctx: case_several(ctx, 2, True),
    "readahead": case_readahead,
    "sighup": lambda ctx: case_restart(ctx, "sighup"),
    "kill9": lambda ctx: case_restart(ctx, "kill9"),
    "restartatload": case_restart_at_load,
    "file": case_file,
    "corrupt": case_corrupt,
    "once": case_once,
    "vmkilled": case_vm_killed,
    "http4k": lambda ctx: case_http(ctx, False),
    "httppacked": lambda ctx: case_http(ctx, True),
    "prefetch": case_prefetch,
}


# --- benchmark ------------------------------------------------------------------------------------

def bench(ctx, args):
    mode = 1 if args.mode == "scattered" else 0
    npages = 8192
    state, mem = make_snapshot(ctx.fc, ctx.guest, ctx.work, False)
    write_mailbox(mem, mode, npages, passes=2)
    warm(mem)
    snapshots = {"4K": (state, mem)}
    if args.huge:
        # A 2 MiB guest of its own (File cannot restore hugetlbfs guests: Uffd only). Each
        # Firecracker reserves its 80 huge pages at mmap; the boot VM's are back before restores.
        hdir = os.path.join(ctx.work, "huge")
        os.mkdir(hdir)
        hstate, hmem = make_snapshot(ctx.fc, ctx.guest, hdir, True)
        write_mailbox(hmem, mode, npages, passes=2)
        warm(hmem)
        snapshots["2M"] = (hstate, hmem)
    variants = [("file", None, "4K")]
    servers = {}
    variants.append(("serve", [], "4K"))
    for ra in args.readahead:
        variants.append((f"serve --readahead {ra}", ["--readahead", ra], "4K"))
    for v in args.serve_variant:
        label, _, extra = v.partition("=")
        variants.append((label, extra.split(), "4K"))
    if args.huge:
        variants.append(("serve, 2 MiB guest (huge_pages 2M)", [], "2M"))
    if args.prefetch:
        # Issue 12: record the working set of one restore of this snapshot (its first pass),
        # then serve the measured restores with --prefetch of that recording.
        ws = os.path.join(ctx.work, "vm.ws")
        rec = Serve(ctx.uffdctl, ctx.work, mem, name="record", extra=["--record-working-set", ws], cpu=args.serve_cpu)
        fc, t0, _ = restore(ctx.fc, ctx.work, "record", state, {"backend_type": "Uffd", "backend_path": rec.sock}, cpu=args.vm_cpu)
        verdict(fc, t0, 300, npages, mode)
        fc.kill()
        if rec.wait_event("working set recorded", 20) is None:
            raise Failure(f"serve did not record the working set: {rec.out.text()[-2000:]}")
        rec.stop()
        variants.append(("serve --prefetch (recorded once)", ["--prefetch", ws], "4K"))
    remote = None
    if args.remote_latency_ms is not None:
        # Issue 12: the same snapshot from a remote server: nginx behind a proxy adding
        # --remote-latency-ms to every request; raw (2 MiB chunks on the deferred path) and
        # packed with 4 KiB chunks (one request per faulting page), on demand and prefetched.
        www = os.path.join(ctx.work, "www")
        os.makedirs(www, exist_ok=True)
        shutil.copyfile(mem, os.path.join(www, "vm.mem"))
        subprocess.run([ctx.uffdctl, "snapshot", "pack", "--chunk-size", "4K", mem, os.path.join(www, "vm4k.pack")],
                       check=True, stdout=subprocess.DEVNULL)
        nginx, base = start_nginx(ctx.work, www)
        host, port = base.rsplit("//", 1)[1].split(":")
        proxy = DelayProxy((host, int(port)), args.remote_latency_ms)
        remote = f"http://127.0.0.1:{proxy.port}"
        lat = f"+{args.remote_latency_ms:g} ms"
        variants.append((f"remote {lat}, on demand (2 MiB chunks)", ["@URL", f"{remote}/vm.mem"], "4K"))
        variants.append((f"remote {lat}, on demand (packed, 4 KiB chunks)", ["@URL", f"{remote}/vm4k.pack"], "4K"))
        if args.prefetch:
            variants.append((f"remote {lat}, --prefetch (2 MiB chunks)", ["@URL", f"{remote}/vm.mem", "--prefetch", ws], "4K"))
            variants.append((f"remote {lat}, --prefetch (packed, 4 KiB chunks)", ["@URL", f"{remote}/vm4k.pack", "--prefetch", ws], "4K"))
    # A remote row gets a new serve per restore: a server keeps its chunk cache across VMs, so a
    # second restore from the same one would be served from memory, not from the remote server.
    fresh = {}
    for name, extra, snap in variants:
        if extra is not None:
            source = snapshots[snap][1]
            if extra[:1] == ["@URL"]:
                source, extra = extra[1], extra[2:]
                fresh[name] = (source, extra)
            servers[name] = Serve(ctx.uffdctl, ctx.work, source, name=f"s{len(servers)}", extra=extra,
                                  cpu=args.serve_cpu)
    variants = [(name, snap) for name, _, snap in variants]
    samples = {name: [] for name, _ in variants}
    loads = {name: [] for name, _ in variants}
    present = {name: [] for name, _ in variants}
    faults = {name: [] for name, _ in variants}
    p50 = {name: [] for name, _ in variants}
    served = {name: 0 for name, _ in variants}
    requests = {}
    run = 0
    for r in range(args.runs + 1):           # run 0 warms everything up and is dropped
        for name, snap in (variants if r % 2 == 0 else list(reversed(variants))):
            if name in fresh and served[name] > 0:
                servers[name].stop()
                source, extra = fresh[name]
                servers[name] = Serve(ctx.uffdctl, ctx.work, source, name=f"f{run}", extra=extra, cpu=args.serve_cpu)
                served[name] = 0
            backend = ({"backend_type": "File", "backend_path": mem} if name == "file"
                       else {"backend_type": "Uffd", "backend_path": servers[name].sock})
            fc, t0, t1 = restore(ctx.fc, ctx.work, f"b{run}", snapshots[snap][0], backend, cpu=args.vm_cpu)
            run += 1
            res = verdict(fc, t0, 300, npages, mode)
            # The second pass reads the same pages, now present: the guest's own cost under PVM.
            first = fc.wait_guest("OK", 0)
            second = fc.wait_guest("OK", 60, first[2] + 1)
            if second is None:
                raise Failure(f"{fc.name}: no second pass: {fc.out.text()[-500:]}")
            fc.kill()
            gone = None
            if name in servers:
                served[name] += 1
                gone = servers[name].wait_event("VM gone", 20, served[name])
                if gone is None or gone.get("fallbacks") != 0 or gone.get("failures") != 0:
                    raise Failure(f"{name}: no clean 'VM gone' summary: {gone}")
            if r > 0:
                if gone is not None:
                    faults[name].append(int(gone["faults"]))
                    if "image_requests" in gone:
                        requests.setdefault(name, []).append(int(gone["image_requests"]))
                    if gone["p50_us"] != "-":  # "-": no fault at all (e.g. everything prefetched)
                        p50[name].append(float(gone["p50_us"]))
                samples[name].append(res["to_verified_ms"])
                loads[name].append(round((t1 - t0) * 1000, 2))
                present[name].append(round((second[0] - first[0]) * 1000, 2))
    for s in servers.values():
        s.stop()
    if remote is not None:
        proxy.close()
        nginx.terminate()
    base = statistics.median(samples["file"])
    rows = []
    for name, _ in variants:
        med = statistics.median(samples[name])
        rows.append({"variant": name, "median_ms": round(med, 1), "min_ms": min(samples[name]),
                     "max_ms": max(samples[name]), "load_median_ms": round(statistics.median(loads[name]), 1),
                     "present_pass_median_ms": round(statistics.median(present[name]), 1),
                     "ratio_to_file": round(med / base, 2),
                     "min_ratio_to_file": round(min(samples[name]) / min(samples["file"]), 2),
                     "samples_ms": samples[name],
                     "faults_median": statistics.median(faults[name]) if faults[name] else None,
                     "serve_p50_us_median": statistics.median(p50[name]) if p50[name] else None,
                     "remote_requests_median": statistics.median(requests[name]) if name in requests else None})
    return {"mode": args.mode, "pages": npages, "runs": args.runs, "vm_cpu": args.vm_cpu,
            "serve_cpu": args.serve_cpu, "rows": rows}


def markdown(result):
    out = [f"| variant ({result['mode']}, {result['pages']} pages = 32 MiB) | PUT load → verified pass, median ms | min–max ms | PUT /snapshot/load ms | 2nd pass (memory present) ms | uffd faults | serve p50 µs | ratio to File (medians) | ratio to File (minima) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = "—" if r["faults_median"] is None else f"{r['faults_median']:g}"
        q = "—" if r["serve_p50_us_median"] is None else f"{r['serve_p50_us_median']:g}"
        out.append(f"| {r['variant']} | {r['median_ms']} | {r['min_ms']}–{r['max_ms']} | {r['load_median_ms']} | {r['present_pass_median_ms']} | {f} | {q} | {r['ratio_to_file']}× | {r['min_ratio_to_file']}× |")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------

class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("e2e", help="one end-to-end case")
    e.add_argument("--case", required=True, choices=sorted(CASES))
    b = sub.add_parser("bench", help="restore benchmark (File vs serve), interleaved")
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--mode", choices=["sequential", "scattered"], default="sequential")
    b.add_argument("--readahead", action="append", default=None, help="a serve --readahead SIZE variant (repeatable)")
    b.add_argument("--serve-variant", action="append", default=[], metavar="LABEL=ARGS",
                   help="another serve row with these extra arguments, e.g. 'prefetch=--prefetch ws.bin'")
    b.add_argument("--huge", action="store_true", help="add a row: a 2 MiB (hugetlbfs) guest served by serve")
    b.add_argument("--prefetch", action="store_true", help="add a row: serve --prefetch of a working set recorded from one restore first")
    b.add_argument("--remote-latency-ms", type=float, default=None,
                   help="add rows: the snapshot from nginx behind a proxy adding this latency per request (with --prefetch, prefetched too)")
    b.add_argument("--vm-cpu", type=int, default=0)
    b.add_argument("--serve-cpu", type=int, default=0)
    b.add_argument("--markdown", action="store_true")
    g = sub.add_parser("guest", help="build the guest and print its path")
    g.add_argument("--out", help="directory for guest.elf (default: a temporary one, kept)")
    for p in (e, b):
        p.add_argument("--uffdctl", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    # A watchdog's SIGTERM still runs the cleanup (children killed, huge pages given back).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ctx = Ctx()
    if args.cmd == "guest":
        out = args.out or tempfile.mkdtemp(prefix="uffdkit-guest-")
        os.makedirs(out, exist_ok=True)
        try:
            print(build_guest(out))
        except (Skip, Failure) as e:
            print(f"fcrig: {e}", file=sys.stderr)
            return 1
        return 0
    ctx.work = tempfile.mkdtemp(prefix="uffdkit-fcrig-")
    result, code = {}, 0
    try:
        ctx.guest = build_guest(ctx.work)
        need_kvm()
        ctx.fc = firecracker_binary()
        ctx.uffdctl = os.path.abspath(args.uffdctl)
        if not os.access(ctx.uffdctl, os.X_OK):
            raise Skip(f"{args.uffdctl} is not an executable uffdctl")
        result = {"firecracker": ctx.fc}
        if args.cmd == "e2e":
            result["case"] = args.case
            result.update(CASES[args.case](ctx))
        else:
            if args.readahead is None:
                args.readahead = ["64K"]
            with (HugePages(2 * MEM_MIB // 2) if args.huge else NullCtx()):
                result.update(bench(ctx, args))
        result["passed"] = True
    except Skip as s:
        result.update({"skip": str(s)})
        code = 77
    except Failure as f:
        result.update({"passed": False, "error": str(f)})
        code = 1
    finally:
        cleanup_children()
        if not args.keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    if args.cmd == "bench" and args.markdown and code == 0:
        print(markdown(result))
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
