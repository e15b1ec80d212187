# Shared settings of the local control plane scripts (sourced, not run).
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"
SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
BIN_DIR=$SENDENSE_CACHE/k8s/$K8S_VERSION/bin
# Runtime state (certs, etcd data, logs, pids). Every control plane process has this path on its
# command line, which is how down.sh finds them all.
STATE_DIR=${SENDENSE_CLUSTER_DIR:-$SENDENSE_CACHE/cluster}
KUBECONFIG_PATH=$STATE_DIR/admin.kubeconfig
ETCD_PORT=${SENDENSE_ETCD_PORT:-23790}
ETCD_PEER_PORT=${SENDENSE_ETCD_PEER_PORT:-23800}
APISERVER_PORT=${SENDENSE_APISERVER_PORT:-16443}
CONTROLLER_MANAGER_PORT=${SENDENSE_CONTROLLER_MANAGER_PORT:-16457}
SCHEDULER_PORT=${SENDENSE_SCHEDULER_PORT:-16459}

# kubectl within one minor version of the control plane: the machine's versioned kubectl if
# there is one, else one built into the cache by build.sh.
find_kubectl() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local m
  for m in "$minor" $((minor - 1)) $((minor + 1)); do
    for c in "kubectl.1.$m" "/usr/lib/google-cloud-sdk/bin/kubectl.1.$m"; do
      if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return; fi
    done
  done
  if command -v kubectl >/dev/null 2>&1; then
    local v; v=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": "\([0-9]*\).*/\1/p' | head -1)
    if [ -n "$v" ] && [ $((v - minor)) -le 1 ] && [ $((minor - v)) -le 1 ]; then command -v kubectl; return; fi
  fi
  echo "$BIN_DIR/kubectl"
}
KUBECTL=${KUBECTL:-$(find_kubectl)}

wait_for() { # what seconds command...  (bounded: never waits forever)
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "$what not ready after ${secs}s; logs in $STATE_DIR/logs" >&2
      tail -n 20 "$STATE_DIR"/logs/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}
