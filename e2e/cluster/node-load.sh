#!/usr/bin/env bash
# Imports image archives (OCI layout or docker-archive, e.g. the second field of each line
# e2e/images/build.sh prints) into the node's containerd, where the kubelet finds them: no
# registry is reachable here, and the node's image GC is off, so they stay until node-down.
#   bash e2e/cluster/node-load.sh ARCHIVE...
set -euo pipefail
source "$(dirname "$0")/env.sh"
owner=$(cat "$NODE_OWNER_DIR/owner" 2>/dev/null || true)
[ "$owner" = "$STATE_DIR" ] || { echo "no node of $STATE_DIR runs (node-up.sh)${owner:+ (the node here belongs to $owner)}" >&2; exit 1; }
sock=$(cat "$NODE_OWNER_DIR/socket")
for archive in "$@"; do
  [ -f "$archive" ] || { echo "no image archive $archive" >&2; exit 1; }
  ctr --address "$sock" --timeout 120s -n k8s.io images import "$archive" >&2
done
