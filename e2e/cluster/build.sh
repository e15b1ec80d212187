#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler (the control plane) and
# kubelet and kube-proxy (the node; skipped with SENDENSE_NODE=0) at one pinned Kubernetes
# version from the Go module proxy, into a cache outside the repository. Only missing binaries
# are built, so adding the node to a cached control plane does not rebuild the control plane.
# k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths, so `go install`
# cannot build it; a small wrapper module replaces each with its published v0.X.Y tag instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"

cache=${SENDENSE_CACHE:-$HOME/.cache/sendense}
out="$cache/k8s/$K8S_VERSION"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler)
[ "${SENDENSE_NODE:-1}" = 0 ] || bins+=(kubelet kube-proxy)

missing=()
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "Kubernetes $K8S_VERSION (${bins[*]}): cached in $out/bin"
  exit 0
fi

command -v go >/dev/null || { echo "go is required to build Kubernetes" >&2; exit 1; }
echo "Kubernetes $K8S_VERSION: building ${missing[*]} into $out (first run only; takes a while on 2 cores)"
work="$out/src"
mkdir -p "$out/bin"
# Upstream builds every component but kubelet with CGO_ENABLED=0; kubelet needs no cgo either
# (nothing it imports is cgo-only on linux), so all are static and need no C toolchain.
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# The wrapper module, made once (the marker says it is complete) and reused by later builds.
if [ ! -f "$work/.wrapper-ready" ]; then
  rm -rf "$work"
  mkdir -p "$work"
  cd "$work"
  go mod init sendense.local/controlplane >/dev/null 2>&1
  staging_minor="v0.${K8S_VERSION#v1.}"
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { echo "could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
  # Every "k8s.io/x => ./staging/src/k8s.io/x" line becomes "k8s.io/x => k8s.io/x@v0.N.P".
  replaces=$(grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk '{print $1}')
  [ -n "$replaces" ] || { echo "no staging replace lines found in $gomod" >&2; exit 1; }
  for m in $replaces; do
    go mod edit -replace="$m=$m@$staging_minor"
  done

  # etcd: a two-line main around the server module's entry point, at the version Kubernetes uses.
  mkdir -p etcd
  cat > etcd/main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO

  go get "k8s.io/kubernetes@$K8S_VERSION"
  etcd_version=$(grep -E '^\s*go\.etcd\.io/etcd/server/v3 ' "$gomod" | awk '{print $2}')
  go get "go.etcd.io/etcd/server/v3@$etcd_version"
  echo "$etcd_version" > "$out/etcd-version"
  touch .wrapper-ready
fi
cd "$work"

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
 -X k8s.io/component-base/version.gitTreeState=clean"
for b in "${missing[@]}"; do
  start=$SECONDS
  if [ "$b" = etcd ]; then
    echo "building etcd $(cat "$out/etcd-version")"
    go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd.tmp" ./etcd
  else
    echo "building $b"
    go build -trimpath -ldflags "$ldflags" -o "$out/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  fi
  mv "$out/bin/$b.tmp" "$out/bin/$b"
  echo "built $b in $((SECONDS - start))s"
done
echo "Kubernetes $K8S_VERSION: built in $out/bin"
