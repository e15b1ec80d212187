#!/usr/bin/env bash
# Starts a real node for the local control plane: containerd (CRI v1, runc, overlayfs,
# cgroupfs), a CNI bridge with host-local IPAM, kubelet and kube-proxy (nftables) at the pinned
# Kubernetes version, registered as Node $NODE_NAME with the host's primary IPv4 address. Pods
# bound to it run as real containers from images imported into containerd (no registry is
# reachable here). All its state is under $STATE_DIR/node. Idempotent: a healthy node of this
# control plane is left alone. One node per machine: the kernel-wide pieces (ports 10250 and
# 10256, cgroups, nftables tables, sysctls, /var/log/containers) are held by the state dir named
# in /run/sendense-node/owner; node-down.sh gives them back.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/env.sh"
start_time=$SECONDS

if [ "$SENDENSE_NODE" = 0 ]; then
  echo "node: not started (SENDENSE_NODE=0)"
  exit 0
fi
fail() { echo "node: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (containers, cgroups, network devices)"
for tool in containerd containerd-shim-runc-v2 runc ctr nft ip conntrack sysctl openssl \
    /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run e2e/install-deps.sh"
done

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=10s "$@"; }
pidfile_alive() { local pid; pid=$(cat "$NODE_DIR/run/$1.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }
node_ready() {
  [ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# --- one node per machine -------------------------------------------------------------------
owner=$(cat "$NODE_OWNER_DIR/owner" 2>/dev/null || true)
if [ -n "$owner" ] && [ "$owner" != "$STATE_DIR" ]; then
  other_sock=$(cat "$NODE_OWNER_DIR/socket" 2>/dev/null || echo "$owner/node/run/containerd.sock")
  if [ -n "$(node_pids "$owner" "$other_sock")" ]; then
    fail "the node of another control plane runs on this machine (state dir $owner); only one" \
      "node per machine: stop it first (SENDENSE_CLUSTER_DIR=$owner bash $here/node-down.sh)," \
      "or start this control plane without a node (SENDENSE_NODE=0)"
  fi
  echo "node: cleaning up the stale node of $owner (its processes are gone)"
  SENDENSE_CLUSTER_DIR="$owner" "$here/node-down.sh" || fail "could not clean up the stale node of $owner"
elif [ "$owner" = "$STATE_DIR" ]; then
  if pidfile_alive containerd && pidfile_alive kubelet && pidfile_alive kube-proxy && node_ready; then
    echo "node $NODE_NAME already up"
    exit 0
  fi
  echo "node: restarting the half-running node of $STATE_DIR"
  "$here/node-down.sh" >/dev/null || fail "could not stop the half-running node of $STATE_DIR"
fi
"$here/status.sh" >/dev/null || fail "the control plane of $STATE_DIR is not up: run $here/up.sh"
# Machine-wide pieces held by something that is not a Sendense node.
for port in 10248 10249 10250 10256; do
  in_use=$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1)
  [ -z "$in_use" ] || fail "port $port (kubelet / kube-proxy) is in use by another process: $in_use"
done
if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
  fail "network device $NODE_BRIDGE exists without a running node: run $here/node-down.sh"
fi
mkdir "$NODE_OWNER_DIR" 2>/dev/null || fail "$NODE_OWNER_DIR exists: another node is starting"
echo "$STATE_DIR" > "$NODE_OWNER_DIR/owner"   # first, so a crash from here on is cleaned as stale
echo "$NODE_SOCKET" > "$NODE_OWNER_DIR/socket"
# What node-down.sh gives back: the sysctls' values and the machine paths that existed.
for s in "${NODE_SYSCTLS[@]}"; do
  v=$(sysctl -n "$s" 2>/dev/null) && echo "$s=$v"
done > "$NODE_OWNER_DIR/sysctl.saved"
for p in "${NODE_MACHINE_PATHS[@]}"; do [ -e "$p" ] && echo "$p"; done > "$NODE_OWNER_DIR/preexisting" || true

# --- binaries, images, state ----------------------------------------------------------------
"$here/build.sh" >&2
pause_line=$(bash "$repo/e2e/images/build.sh" pause | tail -n 1) \
  || fail "building the pause image failed (e2e/images/build.sh pause)"
read -r _ pause_archive pause_ref <<<"$pause_line"
[ -f "$pause_archive" ] && [ -n "$pause_ref" ] || fail "unexpected output of e2e/images/build.sh pause: $pause_line"

host_ip=$(host_ipv4)
[ -z "$(mounts_under "$NODE_DIR")" ] || fail "mounts remain under $NODE_DIR: run $here/node-down.sh"
rm -rf "$NODE_DIR"
mkdir -p "$NODE_DIR"/{run,logs,pki,containerd/root,containerd/state,runc,cni/net.d,cni/ipam,kubelet,pod-logs}
mkdir -p "$(dirname "$NODE_SOCKET")"
cp "$NODE_OWNER_DIR/sysctl.saved" "$NODE_OWNER_DIR/preexisting" "$NODE_DIR/"
export WAIT_LOG_DIR=$NODE_DIR/logs

# --- certificates, signed by the control plane's CA ----------------------------------------
pki=$STATE_DIR/pki
npki=$NODE_DIR/pki
issue() { issue_cert "$npki" "$@"; } # name subject extfile-content
# The Node authorizer and NodeRestriction know the kubelet by this identity.
issue kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" "extendedKeyUsage=clientAuth"
# The apiserver verifies the kubelet's serving certificate (--kubelet-certificate-authority)
# at the node's InternalIP.
issue kubelet-serving "/CN=$NODE_NAME" "subjectAltName=IP:$host_ip,DNS:$NODE_NAME\nextendedKeyUsage=serverAuth"
# The default RBAC binds system:node-proxier to this user.
issue kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"

kubeconfig() { write_kubeconfig "$1" "$npki" "$2"; } # file cert-name
kubeconfig "$NODE_DIR/kubelet.kubeconfig" kubelet-client
kubeconfig "$NODE_DIR/kube-proxy.kubeconfig" kube-proxy

# --- containerd -----------------------------------------------------------------------------
# Its own root, state, socket and runc root, so it never meets a system containerd. The CRI
# plugin of 1.6 puts no rlimits in a container's spec (checked: `ctr containers info` shows
# none), so containers inherit containerd's, which never exceed this sandbox's hard limits
# (nofile 20000): no base_runtime_spec is needed. restrict_oom_score_adj: the sandbox forbids
# lowering a container's oom_score_adj below containerd's own (else "can't get final child's
# PID from pipe").
cat > "$NODE_DIR/containerd.toml" <<TOML
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$NODE_SOCKET"

[ttrpc]
  address = "$NODE_SOCKET.ttrpc"

[debug]
  address = ""
  level = "warn"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # A block volume's device belongs to the container's runAsUser/runAsGroup (as KubeVirt's CDI
  # asks of a cluster), so a non-root pod can write the device of a Block-mode claim.
  device_ownership_from_security_context = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$NODE_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
TOML

# --- CNI: one bridge, one IP per pod, routed from the host ----------------------------------
# isGateway: the bridge holds $POD_GATEWAY, so the host reaches every pod IP and pods reach the
# host (and through kube-proxy's DNAT, Services). No masquerade: pods only talk to this host.
# hairpinMode: a pod reaches itself through its own Service.
cat > "$NODE_DIR/cni/net.d/10-sendense.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE_DIR/cni/ipam"
      }
    }
  ]
}
JSON

start() { # name args...  (detached in its own session; pid recorded)
  local name=$1; shift
  start_daemon "$NODE_DIR/logs/$name.log" "$NODE_DIR/run/$name.pid" "$@"
}
ctr_() { ctr --address "$NODE_SOCKET" --timeout 30s -n k8s.io "$@"; }

start containerd containerd --config "$NODE_DIR/containerd.toml"
wait_for "containerd" 30 ctr_ version
# Images come from archives (no registry here); image GC is off below, so they stay.
ctr_ images import "$pause_archive" >/dev/null
# The list is read whole before grep: `grep -q` leaving early would make ctr fail on a closed
# pipe (pipefail), a failure by chance.
grep -qxF "$pause_ref" <<<"$(ctr_ images ls -q)" \
  || fail "the pause archive $pause_archive did not import as $pause_ref (got: $(ctr_ images ls -q | tr '\n' ' '))"

# --- kubelet --------------------------------------------------------------------------------
# Checked against the machine: cgroup v1 works with failCgroupV1 false; no swap accounting.
# The kubelet sets vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops and
# kernel.keys.root_max* (protectKernelDefaults would refuse to start instead): node-down.sh puts
# the saved values back. makeIPTablesUtilChains false: no iptables chains (kube-proxy's own
# nftables tables are all the node adds). Image GC off (the images cannot be pulled again),
# evictions only on a nearly full disk or memory.
node_taint=${SENDENSE_NODE_TAINT-sendense.io/real-node=true:NoSchedule}
taints_yaml=""
if [ -n "$node_taint" ]; then
  taint_key=${node_taint%%=*}; taint_rest=${node_taint#*=}
  taints_yaml="registerWithTaints:
- {key: \"$taint_key\", value: \"${taint_rest%%:*}\", effect: \"${taint_rest##*:}\"}"
fi
cat > "$NODE_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $host_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$NODE_SOCKET
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: $npki/kubelet-serving.crt
tlsPrivateKeyFile: $npki/kubelet-serving.key
podLogsDir: $NODE_DIR/pod-logs
protectKernelDefaults: false
makeIPTablesUtilChains: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
maxPods: 110
registerNode: true
$taints_yaml
resolvConf: /etc/resolv.conf
serializeImagePulls: false
YAML
start kubelet "$BIN_DIR/kubelet" --config="$NODE_DIR/kubelet.yaml" \
  --kubeconfig="$NODE_DIR/kubelet.kubeconfig" --root-dir="$NODE_DIR/kubelet" \
  --cert-dir="$NODE_DIR/pki" --hostname-override="$NODE_NAME" --node-ip="$host_ip" --v=1
wait_for "node $NODE_NAME Ready" 120 node_ready

# --- kube-proxy -----------------------------------------------------------------------------
# nftables mode: its rules live in its own tables ("ip/ip6 kube-proxy"). Conntrack limits and
# timeouts 0: it changes no sysctl. Bridged pod-to-pod traffic through a ClusterIP needs
# net.bridge.bridge-nf-call-iptables=1 (saved and restored like the kubelet's).
sysctl -qw net.bridge.bridge-nf-call-iptables=1
cat > "$NODE_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: $NODE_DIR/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
YAML
start kube-proxy "$BIN_DIR/kube-proxy" --config="$NODE_DIR/kube-proxy.yaml" --v=1
# Ready when the `kubernetes` Service's address is in its rules.
wait_for "kube-proxy" 60 sh -c 'nft list table ip kube-proxy | grep -q "10\.96\.0\.1 "'

echo "node $NODE_NAME up in $((SECONDS - start_time))s: InternalIP $host_ip, pods $POD_CIDR on $NODE_BRIDGE" \
  "(gateway $POD_GATEWAY), taint ${node_taint:-none}; state in $NODE_DIR"
