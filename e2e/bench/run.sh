#!/usr/bin/env bash
# make bench: Sendense's copy engine against the named baselines, measured in the same run.
#   1. full copy of a 4 GiB disk with ~50% data, NBD source -> qemu-nbd QCOW2: Sendense vs nbdcopy
#   2. incremental with 1% of the disk changed: incremental / full
#   3. the full copy with 20 ms added round trip (delay-proxy, 10 ms each way): 20 ms / 0 ms
#   4. the full copy over a 100 Mbit/s link (tc tbf between two network namespaces): utilisation
# Sizes: BENCH_GIB (default 4), BENCH_LINK_MIB (default 256, the link test's disk), BENCH_RUNS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
GIB=${BENCH_GIB:-4}
LINK_MIB=${BENCH_LINK_MIB:-256}
RUNS=${BENCH_RUNS:-3}

bash e2e/install-deps.sh
cargo build -q --release -p sendense-agent --bin sendense-agent
cargo build -q --release -p sendense-e2e --bin delay-proxy
AGENT=$CARGO_TARGET_DIR/release/sendense-agent
PROXY=$CARGO_TARGET_DIR/release/delay-proxy

W=$(mktemp -d /tmp/sendense-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del sd-bench-agent 2>/dev/null || true
  ip netns del sd-bench-hub 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
wait_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
wait_port() { # [netns] host port
  for _ in $(seq 200); do
    if ${3:+ip netns exec $3} bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on $1:$2" >&2; return 1
}

# A sparse raw disk: alternating 1 MiB of random data and 1 MiB hole (~50% data).
make_source() { # path bytes
  python3 - "$1" "$2" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
mib = 1 << 20
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(0, size // mib, 2):
        f.seek(i * mib)
        f.write(os.urandom(mib))
PY
}

start_source() { # raw socket
  nbdkit -f -U "$2" file "file=$1" 2>>"$W/servers.log" &
  PIDS+=($!)
  wait_socket "$2"
}

# A fresh QCOW2 served by qemu-nbd (multi-conn, like the hub): on a Unix socket or TCP.
fresh_target() { # name size [tcp-port [netns bind-address]]
  local img="$W/$1.qcow2"
  rm -f "$img"
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$2"
  if [ -n "${3:-}" ]; then
    ${4:+ip netns exec $4} qemu-nbd -f qcow2 -t --shared=16 -b "${5:-127.0.0.1}" -p "$3" "$img" 2>>"$W/servers.log" &
    PIDS+=($!)
    wait_port "${5:-127.0.0.1}" "$3" "${4:-}"
  else
    qemu-nbd -f qcow2 -t --shared=16 -k "$W/$1.sock" "$img" 2>>"$W/servers.log" &
    PIDS+=($!)
    wait_socket "$W/$1.sock"
  fi
  TARGET_PID=${PIDS[-1]}
}
stop_target() { kill "$TARGET_PID" 2>/dev/null || true; wait "$TARGET_PID" 2>/dev/null || true; }

unix_url() { echo "nbd+unix:///?socket=$1"; }
SIZE=$((GIB << 30))
echo "== preparing a ${GIB} GiB source with ~50% data"
make_source "$W/src.raw" "$SIZE"
start_source "$W/src.raw" "$W/src.sock"
SRC=$(unix_url "$W/src.sock")

echo "== 1. full copy: Sendense vs nbdcopy (${RUNS} runs each, alternating; median)"
for r in $(seq "$RUNS"); do
  fresh_target nbdcopy "$SIZE"
  t0=$(now); nbdcopy --flush "$SRC" "$(unix_url "$W/nbdcopy.sock")"; t1=$(now)
  stop_target; calc "$t1 - $t0" >> "$W/t_nbdcopy"; echo >> "$W/t_nbdcopy"
  fresh_target sendense "$SIZE"
  t0=$(now)
  /usr/bin/time -f %M -o "$W/rss" "$AGENT" copy --source "$SRC" --target "$(unix_url "$W/sendense.sock")" > "$W/full.json"
  t1=$(now)
  cat "$W/rss" >> "$W/rss_all"
  if [ "$r" -lt "$RUNS" ]; then stop_target; fi
  calc "$t1 - $t0" >> "$W/t_full"; echo >> "$W/t_full"
done
T_NBDCOPY=$(median < "$W/t_nbdcopy"); T_FULL=$(median < "$W/t_full")
DATA=$(sed -n 's/.*"data":\([0-9]*\).*/\1/p' "$W/full.json")
RSS=$(sort -n "$W/rss_all" | tail -1)
qemu-img compare -U -q -f raw -F qcow2 "$W/src.raw" "$W/sendense.qcow2" || { echo "full copy differs from the source" >&2; exit 1; }
R_FULL=$(calc "$T_NBDCOPY / $T_FULL")

echo "== 2. incremental: 1% of the disk changed, in 64 KiB areas"
AREAS=$(python3 - "$W/src.raw" "$SIZE" <<'PY'
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
chunk = 64 << 10
n = (size // 100) // chunk
starts = sorted(rnd.sample(range(size // chunk), n))
with open(path, "r+b") as f:
    for s in starts:
        f.seek(s * chunk)
        f.write(os.urandom(chunk))
print(",".join(f"{s * chunk}+{chunk}" for s in starts))
PY
)
stop_target
qemu-img create -q -f qcow2 -F qcow2 -b "$W/sendense.qcow2" "$W/incr.qcow2"
qemu-nbd -f qcow2 -t --shared=16 -k "$W/incr.sock" "$W/incr.qcow2" 2>>"$W/servers.log" & PIDS+=($!); TARGET_PID=$!
wait_socket "$W/incr.sock"
t0=$(now)
"$AGENT" copy --kind incremental --areas "$AREAS" --source "$SRC" --target "$(unix_url "$W/incr.sock")" > "$W/incr.json"
t1=$(now); T_INCR=$(calc "$t1 - $t0")
stop_target
qemu-img compare -U -q -f raw -F qcow2 "$W/src.raw" "$W/incr.qcow2" || { echo "incremental chain differs from the source" >&2; exit 1; }
R_INCR=$(calc "$T_INCR / $T_FULL")

echo "== 3. added latency: the same full copy through delay-proxy, 0 ms and 10 ms each way"
lat_run() { # delay-ms tool
  fresh_target lat "$SIZE" 21900
  "$PROXY" --listen 127.0.0.1:21901 --upstream 127.0.0.1:21900 --delay-ms "$1" 2>>"$W/servers.log" & local proxy=$!
  wait_port 127.0.0.1 21901
  local t0 t1
  t0=$(now)
  if [ "$2" = sendense ]; then "$AGENT" copy --source "$SRC" --target nbd://127.0.0.1:21901/ > /dev/null
  else nbdcopy --flush "$SRC" nbd://127.0.0.1:21901/; fi
  t1=$(now)
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
  stop_target
  calc "$t1 - $t0"
}
T_LAT0=$(lat_run 0 sendense); T_LAT20=$(lat_run 10 sendense)
T_NLAT0=$(lat_run 0 nbdcopy); T_NLAT20=$(lat_run 10 nbdcopy)
R_LAT=$(calc "$T_LAT0 / $T_LAT20"); R_NLAT=$(calc "$T_NLAT0 / $T_NLAT20")

echo "== 4. a 100 Mbit/s link between two network namespaces (tc tbf), ${LINK_MIB} MiB disk"
ip netns add sd-bench-agent; ip netns add sd-bench-hub
ip link add sd-bench-a type veth peer name sd-bench-h
ip link set sd-bench-a netns sd-bench-agent; ip link set sd-bench-h netns sd-bench-hub
ip -n sd-bench-agent addr add 10.213.0.1/24 dev sd-bench-a; ip -n sd-bench-hub addr add 10.213.0.2/24 dev sd-bench-h
for ns in sd-bench-agent sd-bench-hub; do ip -n $ns link set lo up; done
ip -n sd-bench-agent link set sd-bench-a up; ip -n sd-bench-hub link set sd-bench-h up
ip netns exec sd-bench-agent tc qdisc add dev sd-bench-a root tbf rate 100mbit burst 64kb latency 100ms
LSIZE=$((LINK_MIB << 20))
make_source "$W/link.raw" "$LSIZE"
start_source "$W/link.raw" "$W/link.sock"
link_run() { # tool
  fresh_target link "$LSIZE" 10809 sd-bench-hub 10.213.0.2
  local tx0 tx1 t0 t1
  tx0=$(ip netns exec sd-bench-agent cat /sys/class/net/sd-bench-a/statistics/tx_bytes)
  t0=$(now)
  if [ "$1" = sendense ]; then
    ip netns exec sd-bench-agent "$AGENT" copy --source "$(unix_url "$W/link.sock")" --target nbd://10.213.0.2:10809/ > "$W/link.json"
  else
    ip netns exec sd-bench-agent nbdcopy --flush "$(unix_url "$W/link.sock")" nbd://10.213.0.2:10809/
  fi
  t1=$(now)
  tx1=$(ip netns exec sd-bench-agent cat /sys/class/net/sd-bench-a/statistics/tx_bytes)
  stop_target
  echo "$(calc "$t1 - $t0") $((tx1 - tx0))"
}
read -r T_LINK TX_LINK < <(link_run sendense)
qemu-img compare -U -q -f raw -F qcow2 "$W/link.raw" "$W/link.qcow2" || { echo "link copy differs from the source" >&2; exit 1; }
read -r T_NLINK TX_NLINK < <(link_run nbdcopy)
LDATA=$(sed -n 's/.*"data":\([0-9]*\).*/\1/p' "$W/link.json")
U_WIRE=$(calc "$TX_LINK * 8 / $T_LINK / 100000000")
U_DATA=$(calc "$LDATA * 8 / $T_LINK / 100000000")
U_NWIRE=$(calc "$TX_NLINK * 8 / $T_NLINK / 100000000")

verdict() { awk "BEGIN { print ($1) ? \"met\" : \"MISSED\" }"; }
mbs() { calc "$1 / $2 / 1000000"; }
echo
echo "== Sendense benchmark results ($(date -u +%FT%TZ), $(nproc) cores)"
printf 'full copy %s GiB, %s MB data: Sendense %ss (%s MB/s), nbdcopy %ss (%s MB/s); agent max RSS %s MiB\n' \
  "$GIB" "$((DATA / 1000000))" "$T_FULL" "$(mbs "$DATA" "$T_FULL")" "$T_NBDCOPY" "$(mbs "$DATA" "$T_NBDCOPY")" "$((RSS / 1024))"
printf '  Sendense/nbdcopy throughput ratio = %s (target >= 1.0: %s)\n' "$R_FULL" "$(verdict "$R_FULL >= 1.0")"
printf 'incremental 1%%: %ss for %s areas; incremental/full = %s (target < 0.05: %s)\n' \
  "$T_INCR" "$(echo "$AREAS" | tr ',' '\n' | wc -l)" "$R_INCR" "$(verdict "$R_INCR < 0.05")"
printf 'added 20 ms round trip: Sendense %ss vs %ss at 0 ms; 20ms/0ms = %s (target >= 0.8: %s); nbdcopy for comparison %s\n' \
  "$T_LAT20" "$T_LAT0" "$R_LAT" "$(verdict "$R_LAT >= 0.8")" "$R_NLAT"
printf '100 Mbit/s link, %s MiB disk: Sendense %ss; link utilisation %s on the wire, %s as payload (target >= 0.95: %s); nbdcopy %s on the wire\n' \
  "$LINK_MIB" "$T_LINK" "$U_WIRE" "$U_DATA" "$(verdict "$U_WIRE >= 0.95")" "$U_NWIRE"
