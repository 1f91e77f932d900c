#!/usr/bin/env bash
# One copy against two (BENCHMARKS.md, "Issue 14: serve path and cold reads"): the in-process
# `copy` session over a raw file, `--file-read pread` (pread into scratch, then UFFDIO_COPY)
# against `--file-read mmap` (UFFDIO_COPY straight from a mapping of the file), interleaved
# (pread mmap pread mmap ...), page cache warm, every byte verified by uffdctl. Two workloads:
#   prefetch: 2 workers reading in a fixed random order with the recorded working set
#             prefetched by the filler thread (--install off --prefetch);
#   ra2m:     1 worker reading sequentially, 2 MiB readahead per fault (--readahead 2M).
# Prints median and min workload seconds of each and the ratio pread/mmap (> 1: mmap faster).
# Usage: scripts/file-read-bench.sh [UFFDCTL] [PAIRS] [SIZE] [DIR...]
set -euo pipefail
U=${1:-.build/release/uffdctl}
PAIRS=${2:-7}
SIZE=${3:-256M}
shift $(( $# < 3 ? $# : 3 ))
if [ $# -gt 0 ]; then DIRS=("$@"); else DIRS=(/dev/shm /var/tmp); fi
bytes=$(python3 -c "s='$SIZE';print(int(s[:-1])*{'K':1<<10,'M':1<<20,'G':1<<30}[s[-1]])")
for d in "${DIRS[@]}"; do
  W=$(mktemp -d "$d/file-read-bench.XXXXXX")
  trap 'rm -rf "$W"' EXIT
  head -c "$bytes" /dev/urandom > "$W/image"
  run() { "$U" copy --source "file:$W/image" --quiet --json "$@" | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d.get("prefetch") or {}; print(d["seconds"], d["faults"], p.get("prefetched_pages",0), d.get("file_read","?"))'; }
  "$U" copy --source "file:$W/image" --install off --access random --threads 2 --quiet --record-working-set "$W/ws" >/dev/null
  for wl in prefetch ra2m; do
    if [ $wl = prefetch ]; then A=(--install off --access random --threads 2 --prefetch "$W/ws"); else A=(--readahead 2M --threads 1 --pin 0); fi
    : > "$W/pread"; : > "$W/mmap"
    for i in $(seq "$PAIRS"); do
      run "${A[@]}" --file-read pread >> "$W/pread"
      run "${A[@]}" --file-read mmap >> "$W/mmap"
    done
    python3 - "$d" "$wl" "$W/pread" "$W/mmap" <<'PY'
import statistics, sys
d, wl = sys.argv[1], sys.argv[2]
rows = {k: [l.split() for l in open(p)] for k, p in (("pread", sys.argv[3]), ("mmap", sys.argv[4]))}
s = {k: [float(x[0]) for x in v] for k, v in rows.items()}
for k in ("pread", "mmap"):
    v = rows[k]
    print(f"{d:9} {wl:8} {k:5} median {statistics.median(s[k])*1e3:8.1f} ms  min {min(s[k])*1e3:8.1f} ms  faults {statistics.median(int(x[1]) for x in v):.0f}  prefetched {statistics.median(int(x[2]) for x in v):.0f}")
print(f"{d:9} {wl:8} pread/mmap: median {statistics.median(s['pread'])/statistics.median(s['mmap']):.2f}x  min {min(s['pread'])/min(s['mmap']):.2f}x  ({len(s['pread'])} interleaved pairs)")
PY
  done
  rm -rf "$W"
done
