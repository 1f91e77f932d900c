#!/usr/bin/env python3
"""Per-fault cost of `uffdctl serve` against the same policy stack in-process.

A client process (`uffdctl handoff-client --bench`) maps 32 MiB of private anonymous memory,
registers it MISSING and reads one byte per 4 KiB page (8192 faults, each a UFFDIO_COPY of a
page pread from the memory file); timed is the touch loop only. Modes, interleaved per round:
  in   the faults are served in the client process (ServedProcess, the code serve runs)
  srv  the uffd is handed to a running `uffdctl serve --no-supervisor`
Client thread and handler readers pinned to CPU 0. Prints both medians and the ratios.
Usage: scripts/serve-fault-cost.py [rounds] (after `swift build -c release`)."""
import json, os, signal, statistics, subprocess, sys, tempfile, time

B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".build", "release", "uffdctl")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 11
d = tempfile.mkdtemp(prefix="serve-bench-")
mem, sock = os.path.join(d, "mem"), os.path.join(d, "s.sock")
with open(mem, "wb") as f:
    f.write(os.urandom(32 << 20))
# --source pread: the same source as the in-process ServedProcess default (the same op).
srv = subprocess.Popen([B, "serve", "--socket", sock, "--memory-file", mem, "--pin", "0", "--no-supervisor", "--source", "pread"],
                       stderr=open(os.path.join(d, "log"), "w"))
time.sleep(1)
res = {"in": [], "srv": []}
try:
    for _ in range(rounds):
        for mode in ("in", "srv"):
            args = [B, "handoff-client", "--socket", sock, "--memory-file", mem, "--size", "32M", "--pin", "0", "--bench"]
            out = subprocess.run(args + (["--in-process"] if mode == "in" else []),
                                 capture_output=True, text=True, check=True).stdout.splitlines()
            assert json.loads(out[1])["ok"], out
            res[mode].append(json.loads(out[0])["ns_per_page"])
finally:
    srv.send_signal(signal.SIGTERM)
    srv.wait()
mi, ms = statistics.median(res["in"]), statistics.median(res["srv"])
print(f"in-process ns/page: median {mi:.0f} min {min(res['in'])} {res['in']}")
print(f"serve      ns/page: median {ms:.0f} min {min(res['srv'])} {res['srv']}")
print(f"ratio serve/in-process: of medians {ms / mi:.3f}, of mins {min(res['srv']) / min(res['in']):.3f}, "
      f"median of per-round ratios {statistics.median(s / i for s, i in zip(res['srv'], res['in'])):.3f}")
