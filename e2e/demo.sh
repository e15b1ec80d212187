#!/usr/bin/env bash
# The demo (`make demo`): brings up the local control plane, installs Sendense's CRDs and applies
# the samples; then backs up a 2-disk VM of the simulated vCenter fully and incrementally with
# the agent, restores both points through their QCOW2 chains and verifies them byte for byte.
# The operator (not yet built) will drive that backup from a BackupJob. Leaves the cluster
# running; `make cluster-down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/cluster/up.sh
source e2e/cluster/env.sh
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=30s "$@"; }

echo; echo "=== installing the CRDs ==="
k apply --server-side -k config/crd
k wait --for=condition=Established --timeout=60s crd/sourcenodes.sendense.io crd/repositories.sendense.io crd/backupjobs.sendense.io
k get crd | grep -E 'NAME|sendense.io'

echo; echo "=== applying the samples to namespace sendense-demo ==="
k create namespace sendense-demo --dry-run=client -o yaml | k apply -f -
k apply -n sendense-demo -k config/samples
k get -n sendense-demo sourcenodes,repositories,backupjobs

echo; echo "=== admission rejects a malformed BackupJob, naming the field ==="
if k create -n sendense-demo -f e2e/invalid/01-backupjob-vm-name-and-uuid.yaml 2>&1; then
  echo "the malformed BackupJob was accepted: the CRDs are not validating" >&2; exit 1
fi

echo; echo "=== backing up a 2-disk VM from the simulated vCenter: full, then incremental, restored and verified"
bash e2e/demo-backup.sh

echo
echo "Demo done. The control plane is still up:"
echo "  export KUBECONFIG=$KUBECONFIG_PATH"
echo "  $KUBECTL get backupjobs -n sendense-demo"
echo "Stop it with: make cluster-down"
