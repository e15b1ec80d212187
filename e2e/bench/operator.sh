#!/usr/bin/env bash
# make bench-operator: the operator at scale (operator/tests/scale.rs, issue 16): N BackupJobs
# at once against N batch/v1 Jobs of the same pod templates, on the real control plane and node
# (started here with their own state directory and ports, like `make test`, and torn down).
# Env: SENDENSE_SCALE_JOBS (300), SENDENSE_SCALE_CONCURRENCY (25), SENDENSE_SCALE_TIMEOUT_SECONDS
# (3600). The table is printed and written to $SENDENSE_CACHE/bench/operator-scale.txt.
# The operator runs optimised, as deployed (SENDENSE_SCALE_RELEASE=0: the test's debug build, like
# the end-to-end tests; quicker to build, slower to run). The pods' images are the dev profile
# (SENDENSE_IMAGE_PROFILE): their binaries copy two 1 MiB disks, which is not what is measured.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
export SENDENSE_CLUSTER_DIR=$SENDENSE_CACHE/cluster-bench
export SENDENSE_ETCD_PORT=24791 SENDENSE_ETCD_PEER_PORT=24801 SENDENSE_APISERVER_PORT=26444
export SENDENSE_CONTROLLER_MANAGER_PORT=26458 SENDENSE_SCHEDULER_PORT=26460
export SENDENSE_NODE_TAINT=
teardown() {
  local rc=$?
  trap - EXIT
  bash e2e/cluster/down.sh || { [ "$rc" -ne 0 ] || rc=1; }
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM
# The API server's audit log says which client sent each request (the report splits by it).
export SENDENSE_APISERVER_AUDIT=1
bash e2e/cluster/up.sh
source e2e/cluster/env.sh
export KUBECONFIG=$KUBECONFIG_PATH KUBECTL
SENDENSE_IMAGE_PROFILE=${SENDENSE_IMAGE_PROFILE:-dev} bash e2e/images/build.sh operator agent \
  | while read -r _ archive _; do bash e2e/cluster/node-load.sh "$archive"; done
mkdir -p "$SENDENSE_CACHE/bench"
export SENDENSE_SCALE_REPORT=$SENDENSE_CACHE/bench/operator-scale.txt
export SENDENSE_SCALE_AUDIT_LOG=$SENDENSE_CLUSTER_DIR/audit.log
profile=()
[ "${SENDENSE_SCALE_RELEASE:-1}" = 1 ] && profile=(--release)
cargo test "${profile[@]}" -p sendense-operator --test scale --locked -- --ignored --nocapture
echo "report: $SENDENSE_SCALE_REPORT"
