#!/usr/bin/env bash
# Exit 0 when every control plane process is alive and the apiserver answers /readyz.
set -uo pipefail
source "$(dirname "$0")/env.sh"
for p in etcd kube-apiserver kube-controller-manager kube-scheduler; do
  pid=$(cat "$STATE_DIR/run/$p.pid" 2>/dev/null) || { echo "$p: not started"; exit 1; }
  kill -0 "$pid" 2>/dev/null || { echo "$p: not running"; exit 1; }
done
curl -sf --max-time 5 --cacert "$STATE_DIR/pki/ca.crt" --cert "$STATE_DIR/pki/admin.crt" \
  --key "$STATE_DIR/pki/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null \
  || { echo "kube-apiserver: not ready"; exit 1; }
echo "control plane $K8S_VERSION up: export KUBECONFIG=$KUBECONFIG_PATH"
