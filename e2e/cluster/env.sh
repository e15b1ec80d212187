# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
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

# The node (node-up.sh): containerd, kubelet and kube-proxy with their state under the control
# plane's state dir. Kernel-wide pieces (the kubelet and kube-proxy ports, cgroups, nftables,
# sysctls, /var/log/containers) allow one node per machine: NODE_OWNER names the state dir whose
# node holds them, and the saved sysctls and the machine paths that existed before it started.
SENDENSE_NODE=${SENDENSE_NODE:-1}
NODE_DIR=$STATE_DIR/node
NODE_NAME=${SENDENSE_NODE_NAME:-sendense-node}
POD_CIDR=10.244.0.0/24
POD_GATEWAY=10.244.0.1
SERVICE_CIDR=10.96.0.0/16
NODE_BRIDGE=sendense0
NODE_OWNER_DIR=/run/sendense-node
# containerd's socket (and its ".ttrpc" twin) must fit a unix socket path (107 bytes); a long
# cache path moves it under /run.
NODE_SOCKET=$NODE_DIR/run/containerd.sock
[ ${#NODE_SOCKET} -le 96 ] || NODE_SOCKET=$NODE_OWNER_DIR/containerd.sock
# Sysctls the kubelet (kernel tunables), the CNI bridge (forwarding) and kube-proxy's bridge
# needs change: saved before the node starts, restored when it stops.
NODE_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.bridge.bridge-nf-call-arptables net.ipv4.conf.all.route_localnet)
# Machine paths the node's pieces create whatever their configuration (kubelet: device-plugins
# and /var/log/containers; containerd's CRI: netns in /run/netns; libcni: its result cache
# /var/lib/cni/results/<network>-*), innermost first. Removed at node-down unless they existed.
NODE_MACHINE_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni/results
  /var/lib/cni /run/netns)
CNI_NETWORK=sendense

# The host's primary IPv4 address (the source of its default route): the apiserver advertises
# it (the `kubernetes` Service's endpoint) and the node registers it as its InternalIP.
host_ipv4() {
  local ip
  ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1)
  [ -n "$ip" ] || ip=$(ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n 1)
  [ -n "$ip" ] || { echo "no global IPv4 address on this host" >&2; return 1; }
  echo "$ip"
}

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
  local deadline=$((SECONDS + secs)) logs=${WAIT_LOG_DIR:-$STATE_DIR/logs}
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "$what not ready after ${secs}s; logs in $logs" >&2
      tail -n 20 "$logs"/*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

# A string as an extended regular expression matching itself (for pgrep -f).
re_escape() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }

# Pids of the node processes of the state dir $1 (containerd socket $2): containerd, kubelet and
# kube-proxy (their --config lies in it) and containerd's shims (started with its socket).
node_pids() {
  local dir sock
  dir=$(re_escape "$1/node/"); sock=$(re_escape "$2")
  pgrep -f -- "--config[= ]$dir" || true
  pgrep -f -- "containerd-shim-runc-v2 .*-address $sock( |\$)" || true
}

# Mount points (as the kernel lists them, innermost last) at or under any of the given paths.
mounts_under() {
  local p
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    m=$(printf '%b' "${m//\\/\\0}")   # mountinfo escapes blanks as \040
    for p in "$@"; do
      case "$m" in "$p"|"$p"/*) echo "$m"; break ;; esac
    done
  done
}

# Runs a daemon detached in its own session, its output in $log, its pid in $pidfile. Every
# inherited file descriptor above 2 is closed first: a daemon must not keep a lock its starter
# held (e.g. `flock /work/e2e.lock make cluster-up` would stay locked while the cluster runs).
start_daemon() { # log pidfile command...
  local log=$1 pidfile=$2; shift 2
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
    done
    exec setsid "$@" >"$log" 2>&1 < /dev/null
  ) &
  echo $! > "$pidfile"
}

# A key and a certificate NAME.{key,crt} in DIR, signed by the cluster CA ($STATE_DIR/pki);
# EXT: the content of an openssl extfile (newlines or \n escapes).
issue_cert() { # dir name subject ext
  local dir=$1 name=$2 ca=$STATE_DIR/pki
  openssl req -newkey rsa:2048 -nodes -subj "$3" -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  printf '%b\n' "$4" > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial \
    -days 3650 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
}

# A kubeconfig FILE for the client certificate NAME in DIR, against the local apiserver.
write_kubeconfig() { # file dir name
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: sendense-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $STATE_DIR/pki/ca.crt
users:
- name: $3
  user:
    client-certificate: $2/$3.crt
    client-key: $2/$3.key
contexts:
- name: sendense-local
  context: {cluster: sendense-local, user: $3, namespace: default}
current-context: sendense-local
KC
}
