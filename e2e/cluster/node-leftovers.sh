#!/usr/bin/env bash
# shellcheck disable=SC2046  # pid lists are split into arguments on purpose
# Prints everything a Sendense node (node-up.sh) left on this machine and exits 1 if there is
# anything: processes, mounts, network devices and namespaces, nftables/iptables rules,
# conntrack entries, cgroups, changed sysctls, machine paths. Run after node-down.sh. When the
# machine's node belongs to another state dir (and runs), only this state dir's own processes
# and mounts are checked.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"

found=0
leftover() { echo "leftover: $*"; found=1; }
lines() { [ -z "$2" ] || while read -r l; do leftover "$1: $l"; done <<<"$2"; }
procs() { # pids... as "pid command line"
  local pid
  for pid in "$@"; do
    [ -r "/proc/$pid/cmdline" ] && echo "$pid $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-160)"
  done
}

owner=$(cat "$NODE_OWNER_DIR/owner" 2>/dev/null || true)
other=""
if [ -n "$owner" ] && [ "$owner" != "$STATE_DIR" ]; then
  sock=$(cat "$NODE_OWNER_DIR/socket" 2>/dev/null || echo "$owner/node/run/containerd.sock")
  [ -z "$(node_pids "$owner" "$sock")" ] || other=$owner
fi

# Processes: this state dir's node, and (machine-wide) any Sendense node's or container's.
lines process "$(procs $(node_pids "$STATE_DIR" "$NODE_SOCKET"))"
lines mount "$(mounts_under "$NODE_DIR")"
if [ -n "$other" ]; then
  [ "$found" = 0 ] || exit 1
  echo "node leftovers of $STATE_DIR: none (the machine's node belongs to $other and runs)"
  exit 0
fi
# (A containerd that is not a Sendense node's, with its shims, is not ours to judge.)
lines process "$(procs $(pgrep -f -- '/node/(containerd\.toml|kubelet\.yaml|kube-proxy\.yaml)' || true) \
  $(pgrep -f -- "containerd-shim-runc-v2 .*-address (.*/node/run|$NODE_OWNER_DIR)/containerd\.sock( |\$)" || true) | sort -u)"
cgroups=""
for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
  for c in "$h"kubepods "$h"kubepods.slice; do
    [ -d "$c" ] || continue
    cgroups+="$c"$'\n'
    lines "process in $c" "$(procs $(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null))"
  done
done
lines cgroup "${cgroups%$'\n'}"

# Mounts: container root file systems and shm anywhere, kubelet volumes, network namespaces.
lines mount "$(mounts_under /var/lib/kubelet; mounts_under /run/netns | grep '^/run/netns/cni-')"
lines "network namespace" "$(ls -d /run/netns/cni-* 2>/dev/null)"

# Network devices: the bridge, and CNI veths (named veth + 8 hex digits by the bridge plugin).
lines "network device" "$(ip -o link show "$NODE_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}'; \
  ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^veth[0-9a-f]{8}$')"

# Packet filtering: kube-proxy's nftables tables, any KUBE-/CNI- chain of iptables (nft or legacy).
lines nftables "$(nft list tables 2>/dev/null | grep -w kube-proxy)"
for save in iptables-save ip6tables-save iptables-legacy-save ip6tables-legacy-save; do
  command -v "$save" >/dev/null || continue
  lines "$save" "$($save 2>/dev/null | grep -E '^:(KUBE|CNI)-' | awk '{print $1}')"
done
if command -v conntrack >/dev/null; then
  n=$( (conntrack -L -s "${POD_CIDR%/*}" --mask-src 255.255.255.0 2>/dev/null
        conntrack -L -d "${POD_CIDR%/*}" --mask-dst 255.255.255.0 2>/dev/null
        conntrack -L -d "${SERVICE_CIDR%/*}" --mask-dst 255.255.0.0 2>/dev/null) | grep -c . )
  [ "$n" = 0 ] || leftover "conntrack: $n entries of pod or Service addresses"
fi

# Sysctls differing from their values before node-up.sh.
if [ -f "$NODE_DIR/sysctl.saved" ]; then
  while IFS='=' read -r key value; do
    now=$(sysctl -n "$key" 2>/dev/null)
    [ -z "$key" ] || [ "$now" = "$value" ] || leftover "sysctl: $key = $now (was $value)"
  done < "$NODE_DIR/sysctl.saved"
fi

# Machine paths the node's pieces create (unless node-up.sh recorded that they existed), and
# the node's entries in them.
if [ -f "$NODE_DIR/preexisting" ]; then
  for p in "${NODE_MACHINE_PATHS[@]}"; do
    grep -qxF "$p" "$NODE_DIR/preexisting" || [ ! -e "$p" ] && continue
    # /run/netns is shared with `ip netns` (the benchmarks make their own there): it is the
    # node's only while it holds the node's cni-* namespaces (listed above).
    if [ "$p" = /run/netns ] && [ -z "$(ls -d /run/netns/cni-* 2>/dev/null)" ]; then
      continue
    fi
    leftover "path: $p"
  done
fi
lines "path" "$(find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" 2>/dev/null;
  ls -d /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null)"
[ ! -e "$NODE_OWNER_DIR" ] || leftover "path: $NODE_OWNER_DIR (owner: ${owner:-none})"

if [ "$found" = 0 ]; then
  echo "node leftovers: none"
else
  exit 1
fi
