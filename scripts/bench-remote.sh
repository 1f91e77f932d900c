#!/usr/bin/env bash
# Remote-source benchmark (BENCHMARKS.md "Remote sources"): a sequential restore of an image over
# loopback with `uffdctl copy --source http://…` against `curl` alone downloading the same bytes
# from the same nginx in the same run; raw and packed images. Every uffdctl run verifies every
# byte (after the timed part). Usage: scripts/bench-remote.sh [SIZE_MiB] [ROUNDS] [RATE]
# With RATE (e.g. 1gbit) the whole run happens in a private network namespace whose loopback
# is shaped by TBF to that rate (needs root: unshare -n, tc).
set -euo pipefail
if [ -n "${3:-}" ] && [ -z "${UFFDKIT_BENCH_SHAPED:-}" ]; then
    exec unshare -n env UFFDKIT_BENCH_SHAPED=1 bash -c \
        'ip link set lo up && tc qdisc add dev lo root tbf rate '"$3"' burst 1mb latency 100ms && exec "$0" "$@"' "$0" "$@"
fi
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
UFFDCTL=${UFFDCTL:-.build/release/uffdctl}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$UFFDCTL" ] || { echo "build first: swift build -c release"; exit 1; }
DIR=$(mktemp -d /tmp/uffdkit-bench-remote.XXXXXX)
chmod 755 "$DIR"
NGINX_PID=
cleanup() { [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
mkdir -p "$DIR/www"
# Half of each 2 MiB chunk random, half a repeated byte (compressible ~2x); every 8th chunk zero.
python3 - "$DIR/www/img" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
chunk = 2 << 20
with open(path, 'wb') as f:
    for c in range(mib // 2):
        if c % 8 == 7:
            f.write(b'\0' * chunk)
        else:
            f.write(os.urandom(chunk // 2) + bytes([c & 0xFF | 1]) * (chunk // 2))
PY
"$UFFDCTL" snapshot pack "$DIR/www/img" "$DIR/www/img.pak" --json > "$DIR/pack.json"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
cat > "$DIR/nginx.conf" <<CONF
$USER_LINE
daemon off; worker_processes 2; pid $DIR/nginx.pid; error_log $DIR/error.log;
events { worker_connections 256; }
http { access_log off; sendfile on; keepalive_requests 100000; client_body_temp_path $DIR/tmp;
       server { listen 127.0.0.1:$PORT; root $DIR/www; } }
CONF
"$NGINX" -c "$DIR/nginx.conf" -p "$DIR" & NGINX_PID=$!
sleep 0.5
URL=http://127.0.0.1:$PORT
BYTES=$((SIZE_MIB << 20))
# Warm the page cache so the server side is the same for every run.
cat "$DIR/www/img" "$DIR/www/img.pak" > /dev/null
curl_gbps() { curl -s -o /dev/null -w '%{size_download} %{time_total}\n' "$1" | awk '{ printf "%.3f", $1 / $2 / 1e9 }'; }
copy_gbps() { "$UFFDCTL" copy --source "$1" --readahead 2M --threads 1 --readers 1 --quiet --json "${@:2}" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["verified"], "not verified"; print("%.3f" % d["gbps"])'; }
[ -n "${3:-}" ] && echo "loopback shaped: $(tc qdisc show dev lo)"
echo "image $SIZE_MIB MiB, packed $(python3 -c 'import json; d=json.load(open("'$DIR/pack.json'")); print("%d MiB, ratio %.2f" % (d["packed_bytes"]>>20, d["ratio"]))'), nginx on loopback, $ROUNDS rounds (median)"
for r in $(seq "$ROUNDS"); do
    echo "round $r: curl raw $(curl_gbps "$URL/img") GB/s, curl packed-file $(curl_gbps "$URL/img.pak") GB/s, " \
         "uffdctl raw $(copy_gbps "$URL/img") GB/s, uffdctl packed $(copy_gbps "$URL/img.pak") GB/s, " \
         "uffdctl raw 16 conns $(copy_gbps "$URL/img" --connections 16) GB/s"
done
