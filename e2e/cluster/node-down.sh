#!/usr/bin/env bash
# Stops the node of this control plane's state dir and gives back everything it took from the
# machine: every process (kube-proxy, kubelet, each container, containerd and its shims), every
# mount (container root file systems, shm, secret and projected volumes, network namespaces),
# the bridge and veths, kube-proxy's nftables tables, conntrack entries of pod and Service
# addresses, the cgroups, the sysctls (saved by node-up.sh) and the machine paths the node's
# pieces create. Then it deletes the Node object if the control plane answers, and ends with
# node-leftovers.sh. Idempotent; every wait is bounded. Logs stay in $STATE_DIR/node/logs.
# The machine-wide pieces are only touched when this state dir holds them (or none does).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
start_time=$SECONDS

owner=$(cat "$NODE_OWNER_DIR/owner" 2>/dev/null || true)
sock=$NODE_SOCKET
[ "$owner" != "$STATE_DIR" ] || sock=$(cat "$NODE_OWNER_DIR/socket" 2>/dev/null || echo "$NODE_SOCKET")
mine() { node_pids "$STATE_DIR" "$sock"; }
if [ -n "$owner" ] && [ "$owner" != "$STATE_DIR" ]; then
  # Another control plane's node holds the machine: only this state dir's own leftovers go.
  for pid in $(mine); do kill -KILL "$pid" 2>/dev/null; done
  for m in $(mounts_under "$NODE_DIR" | tac); do umount "$m" 2>/dev/null || umount -l "$m"; done
  echo "node of $STATE_DIR down (the machine's node belongs to $owner and is left alone)"
  exit 0
fi

# SIGTERM, then SIGKILL after $2 seconds, to the pids printed by the function $1.
stop_pids() {
  local list=$1 secs=$2 pid deadline
  for pid in $($list); do kill -TERM "$pid" 2>/dev/null; done
  deadline=$((SECONDS + secs))
  while [ -n "$($list)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  for pid in $($list); do kill -KILL "$pid" 2>/dev/null; done
}
agents() { # kube-proxy and kubelet of this state dir
  local dir; dir=$(re_escape "$NODE_DIR/")
  pgrep -f -- "/(kubelet|kube-proxy) --config=$dir" || true
}
cgroup_roots() { # the node's top cgroups in every hierarchy (v1 controllers and cgroup2)
  local h c
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    for c in "$h"kubepods "$h"kubepods.slice; do [ -d "$c" ] && echo "$c"; done
  done
}
container_pids() { # every process in the node's cgroups, and every child of its shims
  local c shim
  for c in $(cgroup_roots); do find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null; done
  for shim in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $(re_escape "$sock")( |\$)"); do
    pgrep -P "$shim" || true
  done
}
containerd_pids() { mine; }

# 1. The kubelet and kube-proxy first, so nothing restarts containers or rewrites rules.
stop_pids agents 10
# 2. Every container (pid-namespace inits ignore SIGTERM without a handler: SIGKILL after 3s).
stop_pids container_pids 3
# 3. containerd and its shims.
stop_pids containerd_pids 10
stop_pids container_pids 2
leftover_pids=$(mine; container_pids)
[ -z "$leftover_pids" ] || echo "node: processes survived SIGKILL: $leftover_pids" >&2

# 4. Mounts: container root file systems, shm, kubelet volumes and its rshared root, netns.
node_mounts() { mounts_under "$NODE_DIR" /var/lib/kubelet; mounts_under /run/netns | grep '^/run/netns/cni-' || true; }
deadline=$((SECONDS + 10))
while [ -n "$(node_mounts)" ] && [ $SECONDS -lt $deadline ]; do
  for m in $(node_mounts | tac); do umount "$m" 2>/dev/null; done
  [ -z "$(node_mounts)" ] || sleep 0.2
done
for m in $(node_mounts | tac); do umount -l "$m" 2>/dev/null; done   # busy: detach at least
rm -f /run/netns/cni-* 2>/dev/null

# 5. Network: veths on the bridge (they go with their netns, normally), then the bridge.
for veth in $(ip -o link show master "$NODE_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link delete "$veth" 2>/dev/null
done
ip link delete "$NODE_BRIDGE" 2>/dev/null
# kube-proxy's tables (nftables mode keeps all its rules in them).
for family in ip ip6; do nft delete table "$family" kube-proxy 2>/dev/null; done
# Connection tracking entries of pod and Service addresses (they would only expire later).
conntrack -D -s "${POD_CIDR%/*}" --mask-src 255.255.255.0 >/dev/null 2>&1
conntrack -D -d "${POD_CIDR%/*}" --mask-dst 255.255.255.0 >/dev/null 2>&1
conntrack -D -d "${SERVICE_CIDR%/*}" --mask-dst 255.255.0.0 >/dev/null 2>&1

# 6. cgroups, innermost first (a cgroup goes once its processes are gone).
deadline=$((SECONDS + 10))
while [ -n "$(cgroup_roots)" ] && [ $SECONDS -lt $deadline ]; do
  for c in $(cgroup_roots); do find "$c" -depth -type d -exec rmdir {} + 2>/dev/null; done
  [ -z "$(cgroup_roots)" ] || sleep 0.2
done

# 7. Sysctls back to their values before node-up.sh.
saved=$NODE_OWNER_DIR/sysctl.saved
[ -f "$saved" ] || saved=$NODE_DIR/sysctl.saved
if [ -f "$saved" ]; then
  while IFS='=' read -r key value; do
    [ -z "$key" ] || [ "$(sysctl -n "$key" 2>/dev/null)" = "$value" ] || sysctl -qw "$key=$value"
  done < "$saved"
fi

# 8. What the node's pieces put in machine paths whatever their configuration: our entries
# always; the directories only when node-up.sh recorded that they did not exist before (with no
# record they may well be another runtime's), and /var/lib/kubelet whole (the kubelet's
# device-plugins directory is fixed there).
# libcni's result cache: <network>-<sandbox id>-<interface>, for our network and containerd's
# own loopback network of each of our sandboxes (they were killed, so no CNI DEL removed them).
rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null
for sandbox in "$NODE_DIR"/containerd/root/io.containerd.grpc.v1.cri/sandboxes/*/; do
  [ -d "$sandbox" ] && rm -f /var/lib/cni/results/cni-loopback-"$(basename "$sandbox")"-*
done
find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" -delete 2>/dev/null
preexisting=$NODE_OWNER_DIR/preexisting
[ -f "$preexisting" ] || preexisting=$NODE_DIR/preexisting
if [ -f "$preexisting" ]; then
  for p in "${NODE_MACHINE_PATHS[@]}"; do
    grep -qxF "$p" "$preexisting" && continue
    if [ "$p" = /var/lib/kubelet ]; then
      [ -n "$(mounts_under "$p")" ] || rm -rf "$p"
    else
      rmdir "$p" 2>/dev/null   # only when empty: others (`ip netns`, other runtimes) share them
    fi
  done
fi

# 9. The node's state (logs and the saved values stay for reading after the fact).
if [ -d "$NODE_DIR" ] && [ -z "$(mounts_under "$NODE_DIR")" ]; then
  find "$NODE_DIR" -mindepth 1 -maxdepth 1 ! -name logs ! -name sysctl.saved ! -name preexisting \
    -exec rm -rf {} +
fi
[ -z "$(mounts_under "$NODE_DIR")" ] && rm -rf "$NODE_OWNER_DIR"
[ "$NODE_SOCKET" = "$NODE_DIR/run/containerd.sock" ] || rm -f "$NODE_SOCKET" "$NODE_SOCKET.ttrpc"

# 10. The Node object, when the control plane answers (its pods are then garbage-collected).
if [ -f "$KUBECONFIG_PATH" ]; then
  "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=5s delete node "$NODE_NAME" \
    --ignore-not-found --wait=false >/dev/null 2>&1
fi

if "$here/node-leftovers.sh"; then
  echo "node down in $((SECONDS - start_time))s"
else
  echo "node down in $((SECONDS - start_time))s, with the leftovers above" >&2
  exit 1
fi
