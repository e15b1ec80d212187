#!/usr/bin/env bash
# Builds vcsim-cbt (govmomi's vCenter simulator with CBT, see README.md) into the cache
# outside the repository and prints the binary's path. Go's build cache makes re-runs fast.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SENDENSE_CACHE:-$HOME/.cache/sendense}
out="$cache/bin/vcsim-cbt"
command -v go >/dev/null || { echo "go is required to build vcsim-cbt" >&2; exit 1; }
mkdir -p "$cache/bin"
cd "$here"
# -mod=readonly: build exactly what go.mod/go.sum pin; GOTOOLCHAIN=local: no toolchain download.
# Test binaries running at once (make test's lanes) may build it at the same time: each builds
# into a file of its own and renames it into place (atomic; the last one wins, all identical).
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -o "$tmp" .
chmod 755 "$tmp"
mv -f "$tmp" "$out"
echo "$out"
