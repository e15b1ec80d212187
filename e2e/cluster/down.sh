#!/usr/bin/env bash
# Stops the node (node-down.sh: its pods, containerd, kubelet, kube-proxy and everything they
# changed on the machine), then every process of the local control plane (SIGTERM, then SIGKILL
# after 10s), and leaves none behind. Idempotent. The state directory stays for post-mortem
# reading of the logs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
node_rc=0
"$here/node-down.sh" || node_rc=$?
# Anchored on our binaries so a shell that merely mentions the path is never matched.
pids() { pgrep -f -- "^$SENDENSE_CACHE/k8s/[^ ]*/bin/[^ ]* .*$STATE_DIR/" || true; }
# Stop in reverse order of dependency, so the apiserver is not left talking to a dead etcd.
for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  pid=$(cat "$STATE_DIR/run/$p.pid" 2>/dev/null) && kill -TERM "$pid" 2>/dev/null
done
# Anything else started with our state dir on its command line (e.g. from an older run).
for pid in $(pids); do kill -TERM "$pid" 2>/dev/null; done
deadline=$((SECONDS + 10))
while [ -n "$(pids)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
for pid in $(pids); do kill -KILL "$pid" 2>/dev/null; done
sleep 0.2
if [ -n "$(pids)" ]; then
  echo "control plane processes still alive: $(pids)" >&2
  exit 1
fi
rm -f "$STATE_DIR"/run/*.pid 2>/dev/null
echo "control plane down"
exit "$node_rc"
