#!/usr/bin/env bash
# Starts the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) with RBAC, NodeRestriction and service-account keys, writes an admin
# kubeconfig, then starts the node (node-up.sh; SENDENSE_NODE=0 leaves it out). Idempotent: a
# healthy running control plane is left alone. The apiserver listens on every address and
# advertises the host's primary IPv4 address, so pods reach it through the `kubernetes`
# Service; every kubeconfig still uses 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"

if "$here/status.sh" >/dev/null 2>&1; then
  echo "control plane already up: export KUBECONFIG=$KUBECONFIG_PATH"
  [ "$SENDENSE_NODE" = 0 ] || "$here/node-up.sh"
  exit 0
fi
# Something half-started (or a crashed run) is cleared before a fresh start.
"$here/down.sh" >/dev/null
"$here/build.sh"

# A port already taken (another control plane, another checkout) would only show up as a
# timeout later: say so now.
for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$CONTROLLER_MANAGER_PORT" "$SCHEDULER_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is already in use (another control plane?): stop it, or choose" \
      "other ports with SENDENSE_ETCD_PORT, SENDENSE_ETCD_PEER_PORT, SENDENSE_APISERVER_PORT," \
      "SENDENSE_CONTROLLER_MANAGER_PORT, SENDENSE_SCHEDULER_PORT" >&2
    exit 1
  fi
done

host_ip=$(host_ipv4)
# Never remove a state dir something is still mounted under (a node's containers).
if grep -q " $STATE_DIR/" /proc/self/mountinfo; then
  echo "mounts remain under $STATE_DIR (a node not cleaned up?): run $here/node-down.sh" >&2
  exit 1
fi
rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR"/{pki,etcd,logs,run}
pki=$STATE_DIR/pki

# --- certificates: one CA; serving cert for the apiserver; client certs per identity ---
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sendense-local-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
issue() { issue_cert "$pki" "$@"; } # name subject [extfile-content]
issue apiserver "/CN=kube-apiserver" \
  "subjectAltName=IP:127.0.0.1,IP:$host_ip,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
issue admin "/O=system:masters/CN=sendense-admin" "extendedKeyUsage=clientAuth"
issue controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
issue scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
# The apiserver's identity towards kubelets (logs, exec, port-forward): bound below to the
# built-in system:kubelet-api-admin ClusterRole, which the kubelets' webhook authorizer checks.
issue apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

kubeconfig() { write_kubeconfig "$1" "$pki" "$2"; } # file cert-name
kubeconfig "$KUBECONFIG_PATH" admin
kubeconfig "$STATE_DIR/controller-manager.kubeconfig" controller-manager
kubeconfig "$STATE_DIR/scheduler.kubeconfig" scheduler

start() { # name args...  (runs detached in its own session; pid recorded)
  local name=$1; shift
  start_daemon "$STATE_DIR/logs/$name.log" "$STATE_DIR/run/$name.pid" "$@"
}

start etcd "$BIN_DIR/etcd" --name=sendense --data-dir="$STATE_DIR/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="sendense=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync=true \
  --listen-metrics-urls="" --log-level=warn

wait_for "etcd" 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

# SENDENSE_APISERVER_AUDIT=1: every request's metadata (who, what) in $STATE_DIR/audit.log, for
# the operator's scale benchmark (requests by client).
audit=()
if [ "${SENDENSE_APISERVER_AUDIT:-0}" = 1 ]; then
  printf '%s\n' 'apiVersion: audit.k8s.io/v1' 'kind: Policy' 'omitStages: [RequestReceived]' \
    'rules: [{level: Metadata}]' >"$STATE_DIR/audit-policy.yaml"
  audit=(--audit-policy-file="$STATE_DIR/audit-policy.yaml" --audit-log-path="$STATE_DIR/audit.log"
    --audit-log-maxsize=1000 --audit-log-maxbackup=1)
fi
start kube-apiserver "$BIN_DIR/kube-apiserver" "${audit[@]}" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=0.0.0.0 --advertise-address="$host_ip" --secure-port="$APISERVER_PORT" \
  --cert-dir="$STATE_DIR/pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --authorization-mode=Node,RBAC --allow-privileged=true \
  --enable-admission-plugins=NodeRestriction \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
  --service-cluster-ip-range=10.96.0.0/16 \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --profiling=false --v=1

wait_for "kube-apiserver" 120 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "https://127.0.0.1:$APISERVER_PORT/readyz"

start kube-controller-manager "$BIN_DIR/kube-controller-manager" \
  --kubeconfig="$STATE_DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE_DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE_DIR/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" --cert-dir="$STATE_DIR/pki/cm" \
  --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --profiling=false --v=1

start kube-scheduler "$BIN_DIR/kube-scheduler" \
  --kubeconfig="$STATE_DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE_DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE_DIR/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$STATE_DIR/pki/sched" \
  --leader-elect=false --profiling=false --v=1

wait_for "kube-controller-manager" 60 curl -skf "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
wait_for "kube-scheduler" 60 curl -skf "https://127.0.0.1:$SCHEDULER_PORT/healthz"
# The default ServiceAccount appearing proves the controller-manager's controllers run.
wait_for "default ServiceAccount" 60 "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" get serviceaccount default -n default

"$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" create clusterrolebinding sendense:apiserver-kubelet-client \
  --clusterrole=system:kubelet-api-admin --user=kube-apiserver-kubelet-client >/dev/null

echo "control plane $K8S_VERSION up on https://127.0.0.1:$APISERVER_PORT (pods: https://$host_ip:$APISERVER_PORT)"
[ "$SENDENSE_NODE" = 0 ] || "$here/node-up.sh"
echo "export KUBECONFIG=$KUBECONFIG_PATH"
