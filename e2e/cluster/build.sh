#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler at one pinned
# Kubernetes version from the Go module proxy, into a cache outside the repository.
# k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths, so `go install`
# cannot build it; a small wrapper module replaces each with its published v0.X.Y tag instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"

cache=${SENDENSE_CACHE:-$HOME/.cache/sendense}
out="$cache/k8s/$K8S_VERSION"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler)

have_all=1
for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "control plane $K8S_VERSION: cached in $out/bin"
  exit 0
fi

command -v go >/dev/null || { echo "go is required to build the control plane" >&2; exit 1; }
echo "control plane $K8S_VERSION: building into $out (first run only; takes a while on 2 cores)"
work="$out/src"
rm -rf "$work"
mkdir -p "$work" "$out/bin"
cd "$work"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

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

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
 -X k8s.io/component-base/version.gitTreeState=clean"
for b in kube-apiserver kube-controller-manager kube-scheduler; do
  echo "building $b"
  go build -trimpath -ldflags "$ldflags" -o "$out/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$out/bin/$b.tmp" "$out/bin/$b"
done
echo "building etcd $etcd_version"
go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd.tmp" ./etcd
mv "$out/bin/etcd.tmp" "$out/bin/etcd"
echo "$etcd_version" > "$out/etcd-version"
echo "control plane $K8S_VERSION: built in $out/bin"
