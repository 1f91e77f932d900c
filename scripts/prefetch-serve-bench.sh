#!/usr/bin/env bash
# Working-set prefetch through `uffdctl serve` (BENCHMARKS.md, "Working-set prefetch"): a
# `handoff-client` process hands 16 MiB of its memory to the server and times one read per page
# (--bench), then verifies every page. Interleaved rounds of: on demand (4 KiB per fault), on
# demand with adaptive readahead, --prefetch of a working set recorded once, and both.
# Usage: scripts/prefetch-serve-bench.sh [UFFDCTL] [ROUNDS]
set -euo pipefail
U=${1:-.build/release/uffdctl}
ROUNDS=${2:-7}
DIR=$(mktemp -d /var/tmp/prefetch-serve.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
head -c $((16 << 20)) /dev/urandom > "$DIR/mem"
one() { # one served client; prints ns per page
  rm -f "$DIR/s.sock"
  "$U" serve --socket "$DIR/s.sock" --memory-file "$DIR/mem" --once --no-supervisor "$@" 2>>"$DIR/server.log" &
  local srv=$!
  for _ in $(seq 100); do [ -S "$DIR/s.sock" ] && break; sleep 0.02; done
  "$U" handoff-client --socket "$DIR/s.sock" --memory-file "$DIR/mem" --size 16M --bench | head -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ns_per_page"])'
  wait $srv
}
one --record-working-set "$DIR/vm.ws" >/dev/null
"$U" working-set info "$DIR/vm.ws" | sed 's/^/  /'
: > "$DIR/r"
for i in $(seq "$ROUNDS"); do
  echo "$(one) $(one --readahead adaptive) $(one --prefetch "$DIR/vm.ws") $(one --prefetch "$DIR/vm.ws" --readahead adaptive)" >> "$DIR/r"
done
grep "VM gone" "$DIR/server.log" | grep prefetched_pages | tail -2 | head -1 | sed 's/^/  last prefetched VM: /'
python3 - "$DIR/r" <<'PY'
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1])]
names = ["on demand 4K", "on demand adaptive readahead", "prefetched", "prefetched + adaptive readahead"]
cols = list(zip(*rows))
base = cols[0]
for n, c in zip(names, cols):
    print(f"{n:30s} median {statistics.median(c)/1000:8.2f} us/page  min {min(c)/1000:8.2f}  "
          f"speed-up vs on demand: median {statistics.median(base)/statistics.median(c):.2f}x  min {min(base)/min(c):.2f}x")
print(f"({len(rows)} interleaved rounds)")
PY
