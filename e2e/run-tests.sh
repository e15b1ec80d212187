#!/usr/bin/env bash
# The test command (`make test`, called by .ci/run): lint, unit tests and the CRD drift check,
# then the chart checks and end-to-end tests against a real local control plane started for this run alone (its
# own state directory and ports, so a demo cluster is left alone) and always torn down.
set -euo pipefail
cd "$(dirname "$0")/.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
# Each clean clone compiles the workspace's own crates afresh; incremental caches of those would
# only pile up in the shared target directory (several GB per clone).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# Every clean clone also builds the workspace's own crates (test binaries included) under new
# hashes in the shared target directory, a few GB each time. When the disk is 60% full, earlier
# builds of our crates go; the dependencies' builds stay, so nothing slow is rebuilt.
used=$(df --output=pcent "$SENDENSE_CACHE" 2>/dev/null | tail -n 1 | tr -dc '0-9' || true)
if [ "${used:-0}" -ge "${SENDENSE_PRUNE_AT_PERCENT:-60}" ] && [ -d "$CARGO_TARGET_DIR" ]; then
  echo "disk ${used}% full: removing earlier builds of the workspace's crates from $CARGO_TARGET_DIR"
  cargo clean -q -p sendense-crds -p sendense-contract -p sendense-vsphere -p sendense-guestfs -p sendense-agent \
    -p sendense-operator -p sendense-e2e -p sendense-pause
fi
export SENDENSE_CLUSTER_DIR=$SENDENSE_CACHE/cluster-test
export SENDENSE_ETCD_PORT=24790 SENDENSE_ETCD_PEER_PORT=24800 SENDENSE_APISERVER_PORT=26443
export SENDENSE_CONTROLLER_MANAGER_PORT=26457 SENDENSE_SCHEDULER_PORT=26459
# Teardown, pass or fail: the node (node-down.sh ends with node-leftovers.sh) and the control
# plane. Anything the node left on the machine fails the run.
teardown() {
  local rc=$?
  trap - EXIT
  echo; echo "=== teardown (node and control plane; the node must leave nothing behind) ==="
  bash e2e/cluster/down.sh || { echo "teardown failed or left something behind (above)" >&2; [ "$rc" -ne 0 ] || rc=1; }
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM  # so an interrupted run still tears down via the EXIT trap

step() { echo; echo "=== $* ==="; }
step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit tests (including the CRD drift test)"
cargo test --workspace --lib --bins --locked

step "vCenter simulator with CBT (Go, over real SOAP)"
(cd e2e/vcsim-cbt && GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local go vet ./... && \
  GOFLAGS="-mod=readonly -buildvcs=false" GOTOOLCHAIN=local go test -count=1 ./...)
test -z "$(gofmt -l e2e/vcsim-cbt)" || { echo "gofmt: $(gofmt -l e2e/vcsim-cbt)" >&2; exit 1; }

step "local control plane and its node (containerd, kubelet, kube-proxy; SENDENSE_NODE=0: none)"
# No taint: the operator's pods (hub, agent, probe, cleanup) are scheduled there like on any
# cluster.
export SENDENSE_NODE_TAINT=
bash e2e/cluster/up.sh
source e2e/cluster/env.sh
export KUBECONFIG=$KUBECONFIG_PATH KUBECTL

if [ "${SENDENSE_NODE:-1}" != 0 ]; then
  step "the operator and agent images of this commit (dev profile), loaded into the node"
  SENDENSE_IMAGE_PROFILE=${SENDENSE_IMAGE_PROFILE:-dev} bash e2e/images/build.sh operator agent \
    | while read -r name archive ref; do
        echo "$name: $ref ($(du -h "$archive" | cut -f1))"
        bash e2e/cluster/node-load.sh "$archive"
      done
fi

step "chart and config/ checks (helm lint, kubeconform strict, server dry-run, GitOps diff, promtool rules, dashboard queries)"
eval "$(bash e2e/tools/build.sh)"
export HELM KUBECONFORM PROMTOOL
bash e2e/chart/check.sh

step "agent, operator and end-to-end tests (kube-apiserver $K8S_VERSION, qemu-nbd, nbdkit, vcsim-cbt, the chart-installed operator)"
# The agent's, the CRDs', the test bed's and the guest file systems' tests, one binary at a time
# (the agent's bandwidth test measures a rate: nothing else runs beside it).
cargo test --workspace --exclude sendense-operator --test '*' --locked
# The operator's (e2e/operator-tests.sh: one binary at a time by default, the node test last).
bash e2e/operator-tests.sh

if [ "${SENDENSE_NODE:-1}" != 0 ]; then
  step "the node stops and leaves nothing on the machine (node-down.sh, node-leftovers.sh)"
  bash e2e/cluster/node-down.sh
fi
