#!/usr/bin/env bash
# The window installer where users get it: `uffdctl copy --source file:IMG` (default, --install
# auto) against the per-fault paths of the same session (--readahead 2M and --install off),
# interleaved A B C A B C ..., pinned, page cache warm; every run verifies every byte.
# Usage: scripts/install-cli-bench.sh UFFDCTL RUNS SIZE DIR...   (e.g. .build/release/uffdctl 7 256M /dev/shm /var/tmp)
set -euo pipefail
U=${1:?uffdctl}; RUNS=${2:-7}; SIZE=${3:-256M}; shift 3 || true
DIRS=("$@"); [ ${#DIRS[@]} -gt 0 ] || DIRS=(/dev/shm /var/tmp)
for d in "${DIRS[@]}"; do
  img=$(mktemp "$d/uffdctl-install-bench.XXXXXX")
  trap 'rm -f "$img"' EXIT
  head -c "$SIZE" /dev/urandom > "$img"
  cat "$img" > /dev/null # warm
  fs=$(stat -f -c %T "$d")
  for i in $(seq "$RUNS"); do
    for mode in auto ra2m off; do
      case $mode in
        auto) extra=();;
        ra2m) extra=(--readahead 2M);;
        off) extra=(--install off);;
      esac
      "$U" copy --source "file:$img" --threads 1 --pin 0 --quiet --json "${extra[@]}" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["verified"], d; i=d.get("install",{}); print(sys.argv[1], d["seconds"], d["faults"], d.get("huge_page_bytes",0), i.get("mode"), i.get("moved",0), i.get("prefetched",0))' "$mode"
    done
  done > "$img.out"
  python3 - "$fs" "$SIZE" "$img.out" <<'PY'
import statistics, sys
fs, size, path = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {}
for l in open(path):
    m, s, f, h, mode, moved, pre = l.split()
    rows.setdefault(m, []).append((float(s), int(f), int(h), mode, int(moved), int(pre)))
base = rows["auto"]
for m in ("auto", "ra2m", "off"):
    r = rows[m]; s = [x[0] for x in r]
    print(f"{fs:6} {size:>5} {m:5} median {statistics.median(s)*1e3:8.1f} ms  min {min(s)*1e3:8.1f} ms  "
          f"x auto median {statistics.median(s)/statistics.median([x[0] for x in base]):5.2f}  min {min(s)/min(x[0] for x in base):5.2f}  "
          f"faults {statistics.median(x[1] for x in r):.0f}  huge {statistics.median(x[2] for x in r)/2**20:.0f} MiB  install {r[0][3]} moved {statistics.median(x[4] for x in r):.0f} prefetched {statistics.median(x[5] for x in r):.0f}")
PY
  rm -f "$img" "$img.out"
done
