#!/usr/bin/env bash
# Runs the images of e2e/images/build.sh in a private containerd, as a node would: its own root,
# state and socket in a temporary directory (no CRI plugin, nothing shared with another
# containerd but /run/containerd's shim and runc directories), each archive imported with
# `ctr -n k8s.io images import`, then `ctr run` as the image's user:
#   pause     runs as 65535 and exits 0 on SIGTERM;
#   operator  `--version` as 65532; and the static binary resolves host names: one from the
#             container's /etc/hosts (NSS files) and, with --net-host, one through the host's DNS
#             resolver (NSS dns) — the kube client then reaches a server, so the error it stops
#             with is not a lookup failure;
#   agent     qemu-img, qemu-nbd, nbdkit (file plugin), nbdinfo and sendense-agent as 65532.
#
#   bash e2e/images/verify.sh [pause] [operator] [agent]     # no argument: all three
#
# Needs containerd, ctr and runc (Debian: containerd). Stops its containerd and removes its
# directories, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { echo "verify: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
for tool in containerd ctr runc; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install containerd)"
done

lines=$(bash e2e/images/build.sh "$@")
D=$(mktemp -d /tmp/sendense-verify-XXXXXX)
run_dir_existed=$([ -d /run/containerd ] && echo yes || echo no)
# Our runc state and cgroup parent, so nothing is shared with another containerd on the machine.
CG=sendense-verify-$$
cleanup() {
  set +e
  if [ -f "$D/pid" ]; then
    # Each task's processes by their host PID (the init's death ends the rest of its PID
    # namespace), then containerd, then any shim of this containerd left over.
    local pid id
    for pid in $(c tasks ls -q 2>/dev/null; c tasks ls 2>/dev/null | awk 'NR > 1 {print $2}'); do
      case $pid in *[!0-9]*) ;; *) kill -9 "$pid" 2>/dev/null ;; esac
    done
    for id in $(c containers ls -q 2>/dev/null); do
      c tasks delete -f "$id" >/dev/null 2>&1
      c containers rm "$id" >/dev/null 2>&1
    done
    pid=$(cat "$D/pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    for pid in $(pgrep -f -- "-address $D/sock"); do kill -9 "$pid" 2>/dev/null; done
  fi
  grep " $D/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$D"
  # The containers' cgroups (one parent of our own in every hierarchy).
  find /sys/fs/cgroup -depth -type d -path "*/$CG*" -exec rmdir {} + 2>/dev/null
  # /run/containerd is containerd's fixed place for shim sockets: removed only when this
  # script made it and no other containerd runs.
  if [ "$run_dir_existed" = no ] && ! pgrep -x containerd >/dev/null; then
    rm -rf /run/containerd
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat > "$D/config.toml" <<EOF
version = 2
root = "$D/root"
state = "$D/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$D/sock"
[ttrpc]
  address = "$D/sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
setsid containerd --config "$D/config.toml" > "$D/containerd.log" 2>&1 &
echo $! > "$D/pid"
c() { ctr -a "$D/sock" -n k8s.io "$@"; }
for _ in $(seq 100); do c version >/dev/null 2>&1 && break; sleep 0.1; done
c version >/dev/null || { cat "$D/containerd.log" >&2; fail "containerd did not start"; }

# ctr run with the image's own user and config, a fresh container id, our runc root and
# cgroup parent, and a deadline; extra ctr flags in the array `flags`. The runtime's default
# rlimits (nofile 1024) stay under this machine's limit (nofile 20000).
flags=()
crun() {
  local image=$1 id="check-$RANDOM$RANDOM"
  shift
  timeout -s KILL 120 ctr -a "$D/sock" -n k8s.io run --rm --runc-root "$D/runc" --cgroup "$CG/$id" \
    "${flags[@]}" "$image" "$id" "$@" < /dev/null
}
uid_of() { # $1 image: the uid its config runs as, as the runtime computes it
  local id="uid-check-$RANDOM$RANDOM"
  c containers create "$1" "$id" >/dev/null
  c containers info "$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Spec"]["process"]["user"]["uid"])'
  c containers rm "$id" >/dev/null
}

# fd 3: ctr reads its standard input.
while read -r name archive ref <&3; do
  [ -n "$name" ] || continue
  start=$(date +%s%N)
  c images import "$archive" >/dev/null
  log "$name: imported $ref in $((($(date +%s%N) - start) / 1000000)) ms"
  grep -qx "$ref" <<<"$(c images ls -q)" || fail "$name: $ref not in containerd after the import"
  size=$(c images ls | awk -v r="$ref" '$1 == r {print $4, $5}')
  unpacked=$(du -sb "$D/root/io.containerd.snapshotter.v1.overlayfs/snapshots" | cut -f1)
  log "$name: image size $size; snapshots on disk now $unpacked bytes"
  case $name in
    pause)
      [ "$(uid_of "$ref")" = 65535 ] || fail "pause does not run as 65535"
      c run -d --runc-root "$D/runc" --cgroup "$CG/pause-check" "$ref" pause-check >/dev/null
      sleep 0.5
      pid=$(c tasks ls | awk '$1 == "pause-check" {print $2}')
      grep -q '^Uid:[[:space:]]*65535' "/proc/$pid/status" || fail "pause process is not uid 65535"
      c tasks kill -s SIGTERM pause-check
      for _ in $(seq 50); do grep -q 'pause-check.*STOPPED' <<<"$(c tasks ls)" && break; sleep 0.1; done
      status=$(c tasks delete pause-check 2>&1 | sed -n 's/.*exit status \([0-9]*\).*/\1/p')
      c containers rm pause-check >/dev/null
      [ "${status:-0}" = 0 ] || fail "pause exited $status on SIGTERM"
      log "pause: ran as 65535, exited 0 on SIGTERM"
      ;;
    operator)
      [ "$(uid_of "$ref")" = 65532 ] || fail "the operator does not run as 65532"
      out=$(crun "$ref" sendense-operator --version)
      log "operator: --version as 65532: $out"
      # Name resolution inside the static binary: a kubeconfig pointing at a name from the
      # container's /etc/hosts (mapped to 127.0.0.1, a closed port: the connection is refused,
      # so the name resolved) and one at a name only DNS knows (a server answers, or the connection fails,
      # but not the lookup). The kubeconfig names a CA, as the in-cluster configuration does:
      # without one the kube client wants the system's CA certificates, which this image has
      # not (it runs in a cluster, with the ServiceAccount's CA).
      printf '127.0.0.1 localhost\n127.0.0.1 sendense-hosts-check\n' > "$D/hosts"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=verify -days 1 \
        -keyout "$D/ca.key" -out "$D/ca.crt" 2>/dev/null
      dns_name=${SENDENSE_VERIFY_DNS_NAME:-deb.debian.org}
      for server in https://sendense-hosts-check:1 "https://$dns_name:443"; do
        cat > "$D/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "$server", certificate-authority-data: "$(base64 -w0 "$D/ca.crt")"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
EOF
        chmod 0644 "$D/kubeconfig" "$D/hosts"
        flags=(--env KUBECONFIG=/kubeconfig --mount "type=bind,src=$D/kubeconfig,dst=/kubeconfig,options=rbind:ro")
        case $server in
          # Only the loopback interface, our /etc/hosts, and a resolv.conf naming the host's DNS
          # server (unreachable from here), as a pod's /etc has both files.
          *sendense-hosts-check*) flags+=(--mount "type=bind,src=$D/hosts,dst=/etc/hosts,options=rbind:ro"
            --mount "type=bind,src=/etc/resolv.conf,dst=/etc/resolv.conf,options=rbind:ro") ;;
          # The host's network; ctr --net-host also mounts the host's /etc/hosts and resolv.conf.
          *) flags+=(--net-host) ;;
        esac
        out=$(crun "$ref" 2>&1) && fail "operator: exited 0 against $server"
        flags=()
        # The innermost cause of the error the operator stopped with.
        msg=$(echo "$out" | sed 's/\x1b\[[0-9;]*m//g' | grep -E '^ +[0-9]+: ' | tail -n 1 | sed 's/^ *//' | cut -c1-200)
        if grep -qi -E 'lookup address|dns error|Name or service not known|failed to resolve' <<<"$out"; then
          echo "$out" >&2
          fail "operator: $server did not resolve inside the image: $msg"
        fi
        case $server in
          *sendense-hosts-check*) grep -qi 'refused' <<<"$out" || fail "operator: expected a refused connection to $server: $msg" ;;
        esac
        log "operator: $server resolved; the operator stopped with: $msg"
      done
      ;;
    agent)
      [ "$(uid_of "$ref")" = 65532 ] || fail "the agent image does not run as 65532"
      for cmd in "id" "qemu-img --version" "qemu-nbd --version" "nbdkit --version" \
        "nbdinfo --version" "sendense-agent --help"; do
        # shellcheck disable=SC2086
        out=$(crun "$ref" $cmd 2>&1) || fail "agent: $cmd: $out"
        log "agent: $cmd -> $(echo "$out" | head -n 1)"
      done
      # nbdkit's file plugin serves a file and qemu-img reads it over NBD, inside the image.
      out=$(crun "$ref" sh -c 'cd /tmp && truncate -s 1M disk.raw &&
        nbdkit -U /tmp/nbd.sock --pidfile /tmp/nbdkit.pid file /tmp/disk.raw &&
        qemu-img info --output=json "nbd+unix:///?socket=/tmp/nbd.sock" | grep virtual-size &&
        kill "$(cat /tmp/nbdkit.pid)"' 2>&1) ||
        fail "agent: nbdkit + qemu-img over NBD: $out"
      log "agent: nbdkit file plugin served a disk that qemu-img read over NBD: $(echo "$out" | tr -d ' ')"
      ;;
  esac
done 3<<< "$lines"
log "all checks passed"
