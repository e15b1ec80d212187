#!/usr/bin/env bash
# Builds helm and kubeconform at the pinned versions (e2e/tools/versions.env) from the Go module
# proxy into a cache outside the repository, keyed by version; prints `NAME=PATH` lines.
# The prometheus-operator CRDs come from its Go module; promtool comes from Debian's prometheus package (e2e/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
source e2e/tools/versions.env
CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}/tools
build() { # name module version
  local dir="$CACHE/$1-$3"
  if [ ! -x "$dir/$1" ]; then
    echo "building $1 $3 (once; cached in $dir)" >&2
    mkdir -p "$dir"
    GOBIN="$dir" GOFLAGS=-mod=mod GOTOOLCHAIN=local go install "$2@$3" >&2
  fi
  echo "$(echo "$1" | tr a-z A-Z)=$dir/$1"
}
build helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
echo "PROMTOOL=$(command -v promtool || echo /usr/bin/promtool)"
# The ServiceMonitor and PrometheusRule CRDs, from the prometheus-operator module (its example/).
dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" | python3 -c "import json,sys; print(json.load(sys.stdin)[\"Dir\"])")
echo "PROMETHEUS_OPERATOR_CRDS=$dir/example/prometheus-operator-crd"
