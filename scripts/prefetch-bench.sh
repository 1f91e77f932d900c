#!/usr/bin/env bash
# Working-set prefetch benchmark (BENCHMARKS.md, "Working-set prefetch"): the in-process `copy`
# session reading a region in a fixed random order, on demand vs with the recorded working set
# prefetched, interleaved in one run (A B A B ...). Prints the median and min workload seconds
# of each and their ratios.
# Usage: [THREADS=n] scripts/prefetch-bench.sh [UFFDCTL] [PAIRS] [SIZE]
set -euo pipefail
U=${1:-.build/release/uffdctl}
PAIRS=${2:-7}
SIZE=${3:-64M}
DIR=$(mktemp -d /var/tmp/prefetch-bench.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
# A file image (page cache warm after the first run) and the generated pattern.
python3 -c "
import os
with open('$DIR/image','wb') as f: f.write(os.urandom($(python3 -c "s='$SIZE';print(int(s[:-1])*{'K':1<<10,'M':1<<20,'G':1<<30}[s[-1]])")))"
run() { "$U" copy "$@" --access random --threads ${THREADS:-2} --quiet --json | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d.get("prefetch") or {}; l=d["fault_latency_us"]; print(d["seconds"], d["faults"], p.get("prefetched_pages",0), p.get("already_present_pages",0), p.get("time_to_last_page_seconds"), l["p50"], l["p99"])'; }
for src in pattern file; do
  # --install off: the on-demand baseline stays one page per fault (auto would load the file in 2 MiB windows).
  if [ $src = file ]; then S=(--source "file:$DIR/image" --install off); else S=(--source pattern --size "$SIZE"); fi
  "$U" copy "${S[@]}" --access random --threads ${THREADS:-2} --quiet --record-working-set "$DIR/$src.ws" >/dev/null
  "$U" working-set info "$DIR/$src.ws" | sed 's/^/  /'
  : > "$DIR/a"; : > "$DIR/b"
  for i in $(seq "$PAIRS"); do
    run "${S[@]}" >> "$DIR/a"
    run "${S[@]}" --prefetch "$DIR/$src.ws" >> "$DIR/b"
  done
  python3 - "$src" "$DIR/a" "$DIR/b" <<'PY'
import statistics, sys
src, a, b = sys.argv[1], [l.split() for l in open(sys.argv[2])], [l.split() for l in open(sys.argv[3])]
sa, sb = [float(x[0]) for x in a], [float(x[0]) for x in b]
fa, fb = statistics.median(int(x[1]) for x in a), statistics.median(int(x[1]) for x in b)
pp = statistics.median(int(x[2]) for x in b); ap = statistics.median(int(x[3]) for x in b)
ttl = [float(x[4]) for x in b if x[4] != "None"]
la = (statistics.median(float(x[5]) for x in a), statistics.median(float(x[6]) for x in a))
lb = (statistics.median(float(x[5]) for x in b), statistics.median(float(x[6]) for x in b))
print(f"{src}: on-demand median {statistics.median(sa)*1e3:.1f} ms (min {min(sa)*1e3:.1f}), faults {fa:.0f}, resolution p50/p99 {la[0]:.1f}/{la[1]:.1f} us")
print(f"{src}: prefetched median {statistics.median(sb)*1e3:.1f} ms (min {min(sb)*1e3:.1f}), faults {fb:.0f}, resolution p50/p99 {lb[0]:.1f}/{lb[1]:.1f} us, "
      f"filler installed {pp:.0f}, found present {ap:.0f}, last page at {statistics.median(ttl)*1e3 if ttl else float('nan'):.1f} ms")
print(f"{src}: speed-up on-demand/prefetched: median {statistics.median(sa)/statistics.median(sb):.2f}x, min {min(sa)/min(sb):.2f}x  ({len(sa)} interleaved pairs)")
PY
done
