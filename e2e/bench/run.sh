#!/usr/bin/env bash
# make bench: Sendense's copy engine against each baseline at its best, measured in the same run,
# printed as one table (case | Sendense | baselines | ratio | target | verdict).
#
# Cases (issue 16):
#   full      full copy of a VM-shaped disk (tmpfs), NBD source -> qemu-nbd QCOW2 target:
#             vs nbdcopy (defaults, and a tuned set), qemu-img convert -W -m16 (ceiling: writes
#             the QCOW2 file itself, no NBD target) and nbdcopy SRC null: (read ceiling)
#   disk      the same on a disk-backed directory (source in the page cache, target fdatasync'd)
#   three     three disks of one VM at once: one agent process vs three nbdcopy processes
#   sparse    a sparse disk with little data; again with nbdkit's delay filter (VDDK-like
#             latency on reads and extents)
#   scattered 100,000 scattered unaligned 4 KiB changed areas (from a file) into a QCOW2 overlay
#             vs one contiguous area of the same bytes
#   wan20/50  copies over a TUN delay line between two network namespaces (TCP sees the delay),
#             bandwidth-capped: data bytes per second vs iperf3 goodput (best of 1 and 4 streams)
#   link      100 Mbit/s + 20 ms: data bytes per second vs iperf3 goodput
#   tls       the hub's NBD over TLS (issue 13): a full copy from a plain local source into the
#             hub's qemu-nbd on TCP, plain vs x509 + client-certificate authz as the hub runs it;
#             the cost as TLS/plain throughput and CPU, vs nbdcopy over TLS to the same server
#   restore   `sendense-agent restore` of a 6-link QCOW2 chain (a full base, then 5 incrementals
#             of 3% of the disk each, written by the agent's incremental copy) into a new sparse
#             raw file on tmpfs, vs qemu-img convert -S 4k -m 8 -W (its best; the target: the
#             agent within 0.8x of its throughput), qemu-img convert's defaults, and nbdcopy from
#             a read-only qemu-nbd of the chain; disk and data bytes per second, CPU and RSS of
#             all processes of a restore (the qemu-nbd servers the agent or nbdcopy start
#             included), outputs compared with the chain and their allocated bytes shown
# Sources come from e2e's vm-disk (seeded): extents of 4 KiB..8 MiB at 512-byte alignment, data
# extents with zero runs inside, random contents. Every tool runs BENCH_RUNS times (default 5)
# in rotation (A B C, then C B A, ...); the table shows medians with (min-max); CPU is user+sys
# of the copying process(es) only (servers excluded), RSS is the largest peak of the copier.
# Every output is compared with its source (qemu-img compare).
#
# Sizes (env): BENCH_QUICK=1 picks small sizes for a run of a few minutes; each can be set:
#   BENCH_FULL_GIB (16; quick 1)  BENCH_DISK_GIB (4; quick 1)  BENCH_THREE_GIB (4 each; quick 1)
#   BENCH_SPARSE_GIB (64; quick 8)  BENCH_SPARSE_DATA_MIB (2048; quick 256)
#   BENCH_INCR_GIB (8; quick 2)  BENCH_AREAS (100000)  BENCH_WAN_MIB (1024; quick 512)
#   BENCH_WAN_MBIT (1000)  BENCH_LINK_MIB (256; quick 96)  BENCH_TLS_GIB (4; quick 1)
#   BENCH_RESTORE_GIB (8; quick 1: the restore case's disk, on BENCH_TMP)
#   BENCH_RUNS (5)  BENCH_CASES (all: "full disk three sparse scattered wan link tls restore")
#   BENCH_TLS_PORT (10964: the tls case's hub on 127.0.0.1)
#   BENCH_TMP (tmpfs dir, default /dev/shm)  BENCH_DISK_TMP (disk dir, default /var/tmp)
#   BENCH_NBDCOPY_TUNED (default "--connections=4 --requests=64 --request-size=1048576")
#   BENCH_DELAY (nbdkit delay filter args, default "delay-read=2ms delay-extents=20ms")
#   BENCH_MERGE_GAP (16384: the scattered case again with the agent's --merge-gap)
#   BENCH_AGENT (an agent binary to measure instead of this checkout's, which is built anyway)
#   BENCH_HUB_AIO (threads, as the hub runs: qemu-nbd's --aio of every QCOW2 target)
#   BENCH_HUB_IMG (the hub's: agent/src/hub.rs IMAGE_OPTIONS; qemu-img -o of every QCOW2 made)
set -euo pipefail
cd "$(dirname "$0")/../.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
Q=${BENCH_QUICK:-0}
pick() { if [ "$Q" = 1 ]; then echo "$2"; else echo "$1"; fi; }
FULL_GIB=${BENCH_FULL_GIB:-$(pick 16 1)}
DISK_GIB=${BENCH_DISK_GIB:-$(pick 4 1)}
THREE_GIB=${BENCH_THREE_GIB:-$(pick 4 1)}
SPARSE_GIB=${BENCH_SPARSE_GIB:-$(pick 64 8)}
SPARSE_DATA_MIB=${BENCH_SPARSE_DATA_MIB:-$(pick 2048 256)}
INCR_GIB=${BENCH_INCR_GIB:-$(pick 8 2)}
NAREAS=${BENCH_AREAS:-100000}
WAN_MIB=${BENCH_WAN_MIB:-$(pick 1024 512)}
WAN_MBIT=${BENCH_WAN_MBIT:-1000}
LINK_MIB=${BENCH_LINK_MIB:-$(pick 256 96)}
TLS_GIB=${BENCH_TLS_GIB:-$(pick 4 1)}
TLS_PORT=${BENCH_TLS_PORT:-10964}
RESTORE_GIB=${BENCH_RESTORE_GIB:-$(pick 8 1)}
RUNS=${BENCH_RUNS:-5}
CASES=${BENCH_CASES:-full disk three sparse scattered wan link tls restore}
TUNED=${BENCH_NBDCOPY_TUNED:---connections=4 --requests=64 --request-size=1048576}
DELAY=${BENCH_DELAY:-delay-read=2ms delay-extents=20ms}
MERGE_GAP=${BENCH_MERGE_GAP:-16384}
# Every QCOW2 the bench creates is laid out like the hub's (agent/src/hub.rs IMAGE_OPTIONS).
HUB_IMG=${BENCH_HUB_IMG:-$(sed -n 's/^pub const IMAGE_OPTIONS: &str = "\(.*\)";$/\1/p' agent/src/hub.rs)}
[ -n "$HUB_IMG" ] || { echo "no IMAGE_OPTIONS in agent/src/hub.rs" >&2; exit 1; }
DATA_PCT=40

bash e2e/install-deps.sh
# One build of both packages: built apart, their shared dependencies get different features
# and are compiled twice.
cargo build -q --release -p sendense-agent -p sendense-e2e --bins
AGENT=${BENCH_AGENT:-$CARGO_TARGET_DIR/release/sendense-agent}
VMDISK=$CARGO_TARGET_DIR/release/vm-disk
LINE=$CARGO_TARGET_DIR/release/delay-line

W=$(mktemp -d "${BENCH_TMP:-/dev/shm}/sendense-bench.XXXXXX")
D=$(mktemp -d "${BENCH_DISK_TMP:-/var/tmp}/sendense-bench.XXXXXX")
R=$W/results
mkdir -p "$R"
NS_A=sd-bench-agent NS_B=sd-bench-hub
PIDS=()
cleanup() {
  local rc=$?
  [ "$rc" = 0 ] || {
    echo "bench failed ($rc); last server and tool messages:" >&2
    tail -5 "$W/servers.log" "$W/tools.log" >&2 2>/dev/null || true
    [ -s "$W/table" ] && { echo "rows measured before the failure:"; column -t -s $'\t' -o ' | ' "$W/table"; }
  }
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $NS_A 2>/dev/null || true
  ip netns del $NS_B 2>/dev/null || true
  rm -rf "$W" "$D"
}
trap cleanup EXIT

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
log() { echo "== $*" >&2; }
wait_socket() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
wait_port() { # host port [netns]
  for _ in $(seq 400); do
    if ${3:+ip netns exec $3} bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on $1:$2" >&2; return 1
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
unix_url() { echo "nbd+unix:///?socket=$1"; }

# A VM-shaped source: raw sparse file from a seed.
make_disk() { # path size-bytes seed [max-data-bytes]
  "$VMDISK" make --path "$1" --size "$2" --data-percent "${DATA_PCT_OVERRIDE:-$DATA_PCT}" --seed "$3" \
    ${4:+--max-data "$4"} > "$1.json"
  log "source $(cat "$1.json")"
}

# nbdkit's file plugin serving a raw file (the nfs transport's source), extra args as filters.
SRC_PID=
serve_source() { # raw socket [--filter=NAME [filter params...]]
  local raw=$1 sock=$2 filter=(); shift 2
  [ $# -gt 0 ] && { filter=("$1"); shift; }
  rm -f "$sock"
  nbdkit -f -U "$sock" "${filter[@]}" file "file=$raw" "$@" 2>>"$W/servers.log" &
  SRC_PID=$!; PIDS+=($SRC_PID)
  wait_socket "$sock"
}

# A fresh QCOW2 target served like the hub serves it (qemu-nbd --shared=8 --cache=writeback
# --aio=threads, the hub's image layout HUB_IMG: 64 KiB clusters with extended L2 entries, as
# agent/src/hub.rs creates them), on a Unix socket or on TCP inside a netns.
TARGET_PID=
serve_target() { # qcow2 size-or-"-b base" sock|tcp:netns:addr:port
  local img=$1 size=$2 where=$3
  rm -f "$img"
  if [[ $size == -b* ]]; then qemu-img create -q -f qcow2 -o "$HUB_IMG" -F qcow2 -b "${size#-b }" "$img"
  else qemu-img create -q -f qcow2 -o "$HUB_IMG" "$img" "$size"; fi
  local opts=(-f qcow2 -t --shared=8 --cache=writeback --aio="${BENCH_HUB_AIO:-threads}")
  if [[ $where == tcp:* ]]; then
    IFS=: read -r _ ns addr port <<< "$where"
    ip netns exec "$ns" qemu-nbd "${opts[@]}" -b "$addr" -p "$port" "$img" 2>>"$W/servers.log" &
    TARGET_PID=$!; PIDS+=($TARGET_PID)
    wait_port "$addr" "$port" "$ns"
  else
    rm -f "$where"
    qemu-nbd "${opts[@]}" -k "$where" "$img" 2>>"$W/servers.log" &
    TARGET_PID=$!; PIDS+=($TARGET_PID)
    wait_socket "$where"
  fi
}

# Runs one tool's command (a bash -c string) under /usr/bin/time and appends
# "wall cpu rss_kib" to $R/<case>.<tool>; its stdout goes to $W/<case>.<tool>.out.
measure() { # case tool command [netns]
  local t0 t1 e u s m
  t0=$(now)
  ${4:+ip netns exec $4} /usr/bin/time -f "%e %U %S %M" -o "$W/time.tmp" bash -c "$3" > "$W/$1.$2.out" 2>>"$W/tools.log" \
    || { echo "$2 failed in case $1: $3" >&2; tail -5 "$W/tools.log" >&2; exit 1; }
  t1=$(now)
  read -r e u s m < <(tail -1 "$W/time.tmp")
  echo "$(calc "$t1 - $t0") $(calc "$u + $s") $m" >> "$R/$1.$2"
}
copy_to_new_target() { # case tool source-url qcow2 size sock reference-raw
  # One copy by sendense, nbdcopy or nbdcopy_tuned into a new QCOW2 served on a Unix socket,
  # measured, then compared with the reference and removed.
  local c=$1 t=$2 src=$3 file=$4 size=$5 sock=$6 ref=$7 tgt
  serve_target "$file" "$size" "$sock"
  tgt=$(unix_url "$sock")
  case $t in
    sendense) measure "$c" "$t" "'$AGENT' copy --source '$src' --target '$tgt'" ;;
    nbdcopy) measure "$c" "$t" "nbdcopy --flush '$src' '$tgt'" ;;
    nbdcopy_tuned) measure "$c" "$t" "nbdcopy --flush --destination-is-zero $TUNED '$src' '$tgt'" ;;
  esac
  stop "$TARGET_PID"; same "$ref" "$file" "$c/$t"; rm -f "$file"
}

same() { # raw qcow2 what
  qemu-img compare -U -q -f raw -F qcow2 "$1" "$2" || { echo "$3: output differs from the source" >&2; exit 1; }
}

# The rotation: run r goes through the tools forward when r is odd, backward when even.
order() { # r tools...
  local r=$1; shift
  if [ $((r % 2)) = 1 ]; then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

# Statistics over the recorded runs: column 1 wall, 2 cpu, 3 rss.
col() { awk -v c="$2" '{print $c}' "$R/$1" | sort -g; }
med() { col "$1" "$2" | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
lo() { col "$1" "$2" | head -1; }
hi() { col "$1" "$2" | tail -1; }
# "3.21s (3.10-3.40)"
wall_txt() { printf '%.2fs (%.2f-%.2f)' "$(med "$1" 1)" "$(lo "$1" 1)" "$(hi "$1" 1)"; }
# throughput of <bytes> over the median wall: "812 MB/s (790-830)"
rate_txt() { # key bytes
  awk -v b="$2" -v m="$(med "$1" 1)" -v l="$(lo "$1" 1)" -v h="$(hi "$1" 1)" \
    'BEGIN { printf "%.0f MB/s (%.0f-%.0f)", b/m/1e6, b/h/1e6, b/l/1e6 }'
}
cpu_txt() { awk -v c="$(med "$1" 2)" -v g="$2" 'BEGIN { printf "%.2f cpu-s/GiB", c/g }'; }
rss_txt() { awk -v k="$(hi "$1" 3)" 'BEGIN { printf "%.0f MiB", k/1024 }'; }
verdict() { awk "BEGIN { print ($1) ? \"met\" : \"MISSED\" }"; }

TABLE=$W/table
row() { # case sendense baselines ratio target verdict
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$TABLE"
}
MAXRSS=0
note_rss() { local k; k=$(hi "$1" 3); [ "$k" -gt "$MAXRSS" ] && MAXRSS=$k; return 0; }

# The best nbdcopy configuration of a case by median wall time: prints its key.
best_of() { # key1 key2 ...
  local best= bt=
  for k in "$@"; do
    local t; t=$(med "$k" 1)
    if [ -z "$best" ] || awk "BEGIN{exit !($t < $bt)}"; then best=$k; bt=$t; fi
  done
  echo "$best"
}

# ---------------------------------------------------------------------------------------------
# full copy (tmpfs or disk): Sendense, nbdcopy default and tuned, qemu-img ceiling, read ceiling
full_case() { # case dir gib
  local c=$1 dir=$2 gib=$3 size=$(($3 << 30))
  log "$c: full copy of a ${gib} GiB VM-shaped disk in $dir, $RUNS runs per tool"
  make_disk "$dir/src.raw" "$size" 11
  serve_source "$dir/src.raw" "$W/src.sock"
  local SRC; SRC=$(unix_url "$W/src.sock")
  local tools=(sendense nbdcopy nbdcopy_tuned qemu_img)
  [ "$c" = full ] && tools+=(read_null)
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" "${tools[@]}"); do
      case $t in
        read_null) measure "$c" "$t" "nbdcopy '$SRC' null:"; continue ;;
        qemu_img)
          rm -f "$dir/qi.qcow2"
          measure "$c" "$t" "qemu-img convert -W -m 16 -O qcow2 -o '$HUB_IMG' '$SRC' '$dir/qi.qcow2'"
          same "$dir/src.raw" "$dir/qi.qcow2" "$c/$t"; rm -f "$dir/qi.qcow2"; continue ;;
      esac
      copy_to_new_target "$c" "$t" "$SRC" "$dir/t.qcow2" "$size" "$W/t.sock" "$dir/src.raw"
    done
  done
  stop "$SRC_PID"; rm -f "$dir/src.raw"
  local best; best=$(best_of "$c.nbdcopy" "$c.nbdcopy_tuned")
  note_rss "$c.sendense"
  local base="nbdcopy $(wall_txt "$c.nbdcopy"); tuned $(wall_txt "$c.nbdcopy_tuned"); qemu-img $(wall_txt "$c.qemu_img")"
  [ "$c" = full ] && base+="; null: $(wall_txt "$c.read_null")"
  local ratio; ratio=$(calc "$(med "$best" 1) / $(med "$c.sendense" 1)")
  row "$c ${gib}GiB time" "$(wall_txt "$c.sendense")" "$base" "$ratio x ${best#$c.}" ">= 1.15" "$(verdict "$ratio >= 1.15")"
  local cr; cr=$(calc "$(med "$c.sendense" 2) / $(med "$best" 2)")
  row "$c ${gib}GiB CPU" "$(cpu_txt "$c.sendense" "$gib")" "${best#$c.} $(cpu_txt "$best" "$gib"); qemu-img $(cpu_txt "$c.qemu_img" "$gib")" "$cr" "<= 0.85" "$(verdict "$cr <= 0.85")"
  local qr; qr=$(calc "$(med "$c.qemu_img" 1) / $(med "$c.sendense" 1)")
  row "$c ${gib}GiB vs qemu-img" "$(wall_txt "$c.sendense")" "qemu-img $(wall_txt "$c.qemu_img")" "$qr" ">= 0.6" "$(verdict "$qr >= 0.6")"
  row "$c ${gib}GiB RSS" "$(rss_txt "$c.sendense")" "${best#$c.} $(rss_txt "$best")" "-" "<= 256 MiB" "$(verdict "$(hi "$c.sendense" 3) <= 262144")"
}

# three disks of one VM at once
three_case() {
  local c=three size=$((THREE_GIB << 30))
  log "$c: three ${THREE_GIB} GiB disks at once, $RUNS runs per tool"
  local srcs=() tgts=() pids=()
  for i in 1 2 3; do
    make_disk "$W/s$i.raw" "$size" $((20 + i))
    serve_source "$W/s$i.raw" "$W/s$i.sock"; pids+=($SRC_PID)
  done
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" sendense nbdcopy nbdcopy_tuned); do
      local tp=() args="" par=""
      for i in 1 2 3; do
        serve_target "$W/t$i.qcow2" "$size" "$W/t$i.sock"; tp+=($TARGET_PID)
        local S T; S=$(unix_url "$W/s$i.sock"); T=$(unix_url "$W/t$i.sock")
        args+=" --source '$S' --target '$T'"
        case $t in
          nbdcopy) par+="nbdcopy --flush '$S' '$T' & p$i=\$!; " ;;
          nbdcopy_tuned) par+="nbdcopy --flush --destination-is-zero $TUNED '$S' '$T' & p$i=\$!; " ;;
        esac
      done
      if [ "$t" = sendense ]; then measure "$c" "$t" "'$AGENT' copy $args"
      else measure "$c" "$t" "${par} wait \$p1 && wait \$p2 && wait \$p3"; fi
      for i in 1 2 3; do stop "${tp[$((i - 1))]}"; same "$W/s$i.raw" "$W/t$i.qcow2" "$c/$t/$i"; rm -f "$W/t$i.qcow2"; done
    done
  done
  for p in "${pids[@]}"; do stop "$p"; done
  rm -f "$W"/s?.raw
  local best; best=$(best_of "$c.nbdcopy" "$c.nbdcopy_tuned")
  note_rss "$c.sendense"
  local ratio; ratio=$(calc "$(med "$best" 1) / $(med "$c.sendense" 1)")
  row "three x ${THREE_GIB}GiB at once" "$(wall_txt "$c.sendense")" "3x nbdcopy $(wall_txt "$c.nbdcopy"); 3x tuned $(wall_txt "$c.nbdcopy_tuned")" \
    "$ratio x ${best#$c.}" ">= 1.1" "$(verdict "$ratio >= 1.1")"
}

# sparse disk with little data; again with VDDK-like delays
sparse_case() {
  local size=$((SPARSE_GIB << 30))
  log "sparse: ${SPARSE_GIB} GiB with ${SPARSE_DATA_MIB} MiB data, $RUNS runs per tool"
  DATA_PCT_OVERRIDE=$(calc "100 * $SPARSE_DATA_MIB / ($SPARSE_GIB * 1024)") make_disk "$W/sp.raw" "$size" 31 $((SPARSE_DATA_MIB << 20))
  for variant in plain delay; do
    local c=sparse_$variant
    if [ $variant = plain ]; then serve_source "$W/sp.raw" "$W/sp.sock"
    else serve_source "$W/sp.raw" "$W/sp.sock" --filter=delay $DELAY; fi
    local SRC; SRC=$(unix_url "$W/sp.sock")
    for r in $(seq "$RUNS"); do
      for t in $(order "$r" sendense nbdcopy nbdcopy_tuned); do
        copy_to_new_target "$c" "$t" "$SRC" "$W/t.qcow2" "$size" "$W/t.sock" "$W/sp.raw"
      done
    done
    stop "$SRC_PID"
    local best; best=$(best_of "$c.nbdcopy" "$c.nbdcopy_tuned")
    note_rss "$c.sendense"
    local ratio; ratio=$(calc "$(med "$best" 1) / $(med "$c.sendense" 1)")
    local what="sparse ${SPARSE_GIB}GiB/${SPARSE_DATA_MIB}MiB data"; [ $variant = delay ] && what+=" + delay ($DELAY)"
    row "$what" "$(wall_txt "$c.sendense")" "nbdcopy $(wall_txt "$c.nbdcopy"); tuned $(wall_txt "$c.nbdcopy_tuned")" \
      "$ratio x ${best#$c.}" ">= 1.0 (no target; shown)" "$(verdict "$ratio >= 1.0")"
  done
  rm -f "$W/sp.raw"
}

# 100,000 scattered 4 KiB areas vs one contiguous area of the same bytes, into QCOW2 overlays
scattered_case() {
  local c=scattered size=$((INCR_GIB << 30))
  log "$c: $NAREAS scattered 4 KiB areas vs one contiguous area, ${INCR_GIB} GiB disk, $RUNS runs each"
  make_disk "$W/base.raw" "$size" 41
  qemu-img convert -O qcow2 -o "$HUB_IMG" "$W/base.raw" "$W/base.qcow2"
  for v in scattered contiguous; do
    cp --sparse=always "$W/base.raw" "$W/$v.raw"
    "$VMDISK" change --path "$W/$v.raw" --areas-out "$W/$v.areas" --count "$NAREAS" --length 4096 --seed 42 \
      $([ $v = contiguous ] && echo --contiguous) > "$W/$v.json"
    log "$v: $(cat "$W/$v.json")"
    serve_source "$W/$v.raw" "$W/$v.sock"; eval "SPID_$v=$SRC_PID"
  done
  rm -f "$W/base.raw"
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" scattered contiguous merged); do
      # merged: the scattered areas, with gaps of at most MERGE_GAP copied along (an option)
      local v=$t extra=
      [ "$t" = merged ] && { v=scattered; extra="--merge-gap $MERGE_GAP"; }
      serve_target "$W/ov.qcow2" "-b $W/base.qcow2" "$W/ov.sock"
      local spid s0; spid=$(eval "echo \$SPID_$v"); s0=$(proc_cpu "$spid")
      measure "$c" "$t" "'$AGENT' copy --kind incremental $extra --areas-file '$W/$v.areas' --source '$(unix_url "$W/$v.sock")' --target '$(unix_url "$W/ov.sock")'"
      # Where the time goes: the source server's and the hub's CPU during this copy.
      calc "$(proc_cpu "$spid") - $s0" >> "$R/$c.$t.src"; echo >> "$R/$c.$t.src"
      hub_cpu "$c" "$t"
      stop "$TARGET_PID"; same "$W/$v.raw" "$W/ov.qcow2" "$c/$t"; rm -f "$W/ov.qcow2"
    done
  done
  stop "$SPID_scattered"; stop "$SPID_contiguous"
  rm -f "$W"/{scattered,contiguous}.raw "$W/base.qcow2"
  note_rss "$c.scattered"
  local ratio; ratio=$(calc "$(med "$c.scattered" 1) / $(med "$c.contiguous" 1)")
  row "$NAREAS x 4KiB scattered areas" "$(wall_txt "$c.scattered")" "contiguous $(($NAREAS * 4 / 1024)) MiB $(wall_txt "$c.contiguous")" \
    "$ratio" "<= 4" "$(verdict "$ratio <= 4")"
  local cpus=
  for t in scattered contiguous; do
    cpus+="${cpus:+; }$t: agent $(awk -v c="$(med "$c.$t" 2)" 'BEGIN { printf "%.2f", c }') + source nbdkit $(medf "$R/$c.$t.src") + hub qemu-nbd $(medf "$R/$c.$t.hub")"
  done
  row "  CPU-s per copy (the reason: every 4 KiB area is a READ and a WRITE)" "$cpus" "-" "-" "none (where the time goes)" "shown"
  local mr; mr=$(calc "$(med "$c.merged" 1) / $(med "$c.contiguous" 1)")
  local sent; sent=$(sed -n 's/^{"bytes":\([0-9]*\).*/\1/p' "$W/$c.merged.out")
  row "  same, gaps <= $MERGE_GAP B copied along (--merge-gap; $((sent >> 20)) MiB sent)" "$(wall_txt "$c.merged")" \
    "contiguous $(wall_txt "$c.contiguous")" "$mr" "<= 4 (option, not default)" "$(verdict "$mr <= 4")"
}

# --- network cases: a TUN delay line between two namespaces --------------------------------
LINE_PID=
net_up() { # one-way-delay-ms rate-mbit
  net_down
  ip netns add $NS_A; ip netns add $NS_B
  "$LINE" --ns-a $NS_A --dev-a sdtun0 --ns-b $NS_B --dev-b sdtun1 --delay-ms "$1" --rate-mbit "$2" 2>>"$W/servers.log" &
  LINE_PID=$!; PIDS+=($LINE_PID)
  for _ in $(seq 100); do ip -n $NS_B link show sdtun1 >/dev/null 2>&1 && break; sleep 0.05; done
  ip -n $NS_A addr add 10.213.1.1 peer 10.213.1.2 dev sdtun0
  ip -n $NS_B addr add 10.213.1.2 peer 10.213.1.1 dev sdtun1
  for x in "$NS_A sdtun0" "$NS_B sdtun1"; do
    set -- $x
    ip -n "$1" link set lo up
    ip -n "$1" link set "$2" mtu 9000 up
  done
}
net_down() {
  [ -n "$LINE_PID" ] && stop "$LINE_PID"; LINE_PID=
  ip netns del $NS_A 2>/dev/null || true
  ip netns del $NS_B 2>/dev/null || true
}

# iperf3 goodput (bytes/s) of one run with `streams` streams, as a tool of the rotation: it
# moves the disk's data bytes (-n), timed like the copiers (whole process, setup included).
iperf_run() { # case tool streams bytes
  ip netns exec $NS_B iperf3 -s -1 -B 10.213.1.2 -p 5201 >/dev/null 2>&1 &
  local sp=$!
  # A test connection would be taken for iperf3's one client: look at the listening sockets.
  for _ in $(seq 200); do ip netns exec $NS_B ss -ltn | grep -q ':5201 ' && break; sleep 0.05; done
  measure "$1" "$2" "iperf3 -c 10.213.1.2 -p 5201 -n $4 -P $3 -J" $NS_A
  wait "$sp" 2>/dev/null || true
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bytes"])' "$W/$1.$2.out" >> "$R/$1.$2.bytes"
}

net_case() { # case one-way-ms mbit mib
  local c=$1 ms=$2 mbit=$3 mib=$4 size=$(($4 << 20))
  log "$c: ${mib} MiB VM-shaped disk over ${mbit} Mbit/s with $((2 * ms)) ms round trip, $RUNS runs per tool"
  net_up "$ms" "$mbit"
  make_disk "$W/n.raw" "$size" 51
  serve_source "$W/n.raw" "$W/n.sock"
  local SRC; SRC=$(unix_url "$W/n.sock") TGT=nbd://10.213.1.2:10809/
  # iperf3 moves as many bytes as the source holds data (a little more than a copier sends:
  # zero runs inside data are not sent), so setup and slow start weigh the same.
  local written; written=$(sed -n 's/.*"data_written":\([0-9]*\).*/\1/p' "$W/n.raw.json")
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" sendense nbdcopy nbdcopy_tuned iperf1 iperf4); do
      case $t in
        iperf1) iperf_run "$c" "$t" 1 "$written"; continue ;;
        iperf4) iperf_run "$c" "$t" 4 "$written"; continue ;;
      esac
      serve_target "$W/t.qcow2" "$size" "tcp:$NS_B:10.213.1.2:10809"
      case $t in
        sendense) measure "$c" "$t" "'$AGENT' copy --source '$SRC' --target '$TGT'" $NS_A ;;
        nbdcopy) measure "$c" "$t" "nbdcopy --flush '$SRC' '$TGT'" $NS_A ;;
        nbdcopy_tuned) measure "$c" "$t" "nbdcopy --flush --destination-is-zero $TUNED '$SRC' '$TGT'" $NS_A ;;
      esac
      stop "$TARGET_PID"; same "$W/n.raw" "$W/t.qcow2" "$c/$t"; rm -f "$W/t.qcow2"
    done
  done
  stop "$SRC_PID"; net_down
  # Data bytes that had to cross: what the agent sent as data (the same for every copier).
  local data; data=$(sed -n 's/.*"data":\([0-9]*\).*/\1/p' "$W/$c.sendense.out")
  rm -f "$W/n.raw"
  # iperf3 goodput per run: its bytes over its wall time
  for k in iperf1 iperf4; do
    paste -d' ' "$R/$c.$k.bytes" "$R/$c.$k" | awk '{print $1/$2}' | sort -g > "$R/$c.$k.gp"
  done
  local g1 g4 gp gk
  g1=$(awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' "$R/$c.iperf1.gp")
  g4=$(awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' "$R/$c.iperf4.gp")
  if awk "BEGIN{exit !($g1 >= $g4)}"; then gp=$g1; gk=1; else gp=$g4; gk=4; fi
  local best; best=$(best_of "$c.nbdcopy" "$c.nbdcopy_tuned")
  note_rss "$c.sendense"
  local ratio; ratio=$(calc "$data / $(med "$c.sendense" 1) / $gp")
  local target=0.9; [ "$c" = link ] && target=0.95
  row "$c: ${mbit}Mbit/s $((2 * ms))ms RTT, $((data / 1000000)) MB data" "$(rate_txt "$c.sendense" "$data")" \
    "iperf3 -P1 $(calc "$g1 / 1e6") MB/s, -P4 $(calc "$g4 / 1e6") MB/s; nbdcopy $(rate_txt "$c.nbdcopy" "$data"); tuned $(rate_txt "$c.nbdcopy_tuned" "$data")" \
    "$ratio x iperf3-P$gk" ">= $target" "$(verdict "$ratio >= $target")"
}

# --- tls: the hub's NBD over TLS against the same hub in plain -------------------------------
# Certificates like the operator's (rcgen: ECDSA P-256, one CA, a server certificate for the
# hub's DNS name, a client certificate whose CN the hub's authz names), made with openssl, plus
# a client certificate of the same CA for another identity (the self-check's refused client).
# The server certificate also carries IP 127.0.0.1: libnbd 1.14 has no tls-hostname and checks
# the URI's host, while the agent checks the hub's name as in production (?tls-hostname=).
HUB_NAME=bench-hub.sendense.svc HUB_CLIENT=sendense-agent.bench
make_certs() { # dir
  local d=$1 ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  mkdir -p "$d/server" "$d/client" "$d/other"
  openssl req -x509 "${ec[@]}" -keyout "$d/ca-key.pem" -out "$d/ca-cert.pem" -days 2 \
    -subj "/O=Sendense/CN=Sendense NBD bench CA" -addext basicConstraints=critical,CA:TRUE,pathlen:0 \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>>"$W/servers.log"
  local role name dir ext
  for role in server client other; do
    case $role in
      server) name=$HUB_NAME dir=server ext="subjectAltName=DNS:$HUB_NAME,IP:127.0.0.1"$'\n'"extendedKeyUsage=serverAuth" ;;
      client) name=$HUB_CLIENT dir=client ext="extendedKeyUsage=clientAuth" ;;
      other) name=sendense-agent.another-job dir=other ext="extendedKeyUsage=clientAuth" ;;
    esac
    local kind=$role; [ "$role" = other ] && kind=client
    openssl req -new "${ec[@]}" -keyout "$d/$dir/$kind-key.pem" -subj "/CN=$name" -out "$d/$dir.csr" 2>>"$W/servers.log"
    openssl x509 -req -in "$d/$dir.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" -CAcreateserial -days 2 \
      -extfile <(printf '%s\nkeyUsage=critical,digitalSignature\n' "$ext") -out "$d/$dir/$kind-cert.pem" 2>>"$W/servers.log"
    cp "$d/ca-cert.pem" "$d/$dir/"
  done
}

# A fresh QCOW2 served on 127.0.0.1:TLS_PORT with the hub's qemu-nbd flags
# (operator/src/resources/hub.rs), TLS and authz included or left out.
serve_hub() { # qcow2 size tls|plain
  rm -f "$1"
  qemu-img create -q -f qcow2 -o "$HUB_IMG" "$1" "$2"
  local tls=()
  [ "$3" = tls ] && tls=(--object "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir=$W/certs/server"
    --tls-creds=tls0 --object "authz-simple,id=authz0,identity=CN=$HUB_CLIENT" --tls-authz=authz0)
  qemu-nbd --format=qcow2 --persistent --shared=8 --bind=127.0.0.1 --port="$TLS_PORT" "${tls[@]}" \
    --cache=writeback --aio="${BENCH_HUB_AIO:-threads}" "$1" 2>>"$W/servers.log" &
  TARGET_PID=$!; PIDS+=("$TARGET_PID")
  wait_port 127.0.0.1 "$TLS_PORT"
}

# The hub's CPU seconds (user+sys of all its threads) since it started for this one copy:
# appended to $R/<case>.<tool>.hub. TLS costs the hub too, not only the agent.
# CPU seconds (user + system) a process has used so far.
proc_cpu() { # pid
  local f; read -ra f < <(sed 's/.*) //' "/proc/$1/stat")
  calc "(${f[11]} + ${f[12]}) / $(getconf CLK_TCK)"
}
# The median of a file of numbers, one a line, with two decimals.
medf() { sort -n "$1" | awk 'NF {a[++n]=$1} END {printf "%.2f", (n%2) ? a[(n+1)/2] : (a[n/2]+a[n/2+1])/2}'; }
hub_cpu() { # case tool
  local f; read -ra f < <(sed 's/.*) //' "/proc/$TARGET_PID/stat")
  printf '%s\n' "$(calc "(${f[11]} + ${f[12]}) / $(getconf CLK_TCK)")" >> "$R/$1.$2.hub"
}

# MiB/s of <bytes> over the median wall: "612 MiB/s (590-630)"
mib_txt() { # key bytes
  awk -v b="$2" -v m="$(med "$1" 1)" -v l="$(lo "$1" 1)" -v h="$(hi "$1" 1)" \
    'BEGIN { printf "%.0f MiB/s (%.0f-%.0f)", b/m/1048576, b/h/1048576, b/l/1048576 }'
}

# Median CPU seconds per copy, the copier's and the hub's (qemu-nbd decrypts), plain and TLS:
# "plain 1.20 + hub 0.80; TLS 1.90 + hub 1.40"
cpu_pair() { # plain-key tls-key
  printf 'plain %.2f + hub %.2f; TLS %.2f + hub %.2f' "$(med "$1" 2)" "$(med "$1.hub" 1)" "$(med "$2" 2)" "$(med "$2.hub" 1)"
}

# Source plain and local (nbdkit, as the agent reads it in production); target the hub's
# qemu-nbd over TCP, once plain and once with TLS + client-certificate authz. nbdcopy does
# the same copies (defaults and tuned, plain and TLS) as the named baseline.
tls_case() {
  local c=tls size=$((TLS_GIB << 30))
  log "$c: full copy of a ${TLS_GIB} GiB VM-shaped disk into the hub's qemu-nbd on TCP, plain and TLS, $RUNS runs per tool"
  make_certs "$W/certs"
  make_disk "$W/tls.raw" "$size" 61
  serve_source "$W/tls.raw" "$W/tls.sock"
  local SRC; SRC=$(unix_url "$W/tls.sock")
  local PLAIN=nbd://127.0.0.1:$TLS_PORT/
  local TLS="nbds://127.0.0.1:$TLS_PORT/?tls-hostname=$HUB_NAME"
  local LTLS="nbds://127.0.0.1:$TLS_PORT/?tls-certificates=$W/certs/client"
  # Self-check: the TLS hub refuses plain NBD and another identity of the same CA, and serves
  # the named client (so the runs below measure the hub's real configuration).
  serve_hub "$W/t.qcow2" "$size" tls
  ! nbdinfo --size "$PLAIN" >/dev/null 2>>"$W/tools.log" || { echo "$c: the TLS hub served plain NBD" >&2; exit 1; }
  ! nbdinfo --size "nbds://127.0.0.1:$TLS_PORT/?tls-certificates=$W/certs/other" >/dev/null 2>>"$W/tools.log" \
    || { echo "$c: the TLS hub served a client its authz does not name" >&2; exit 1; }
  [ "$(nbdinfo --size "$LTLS")" = "$size" ] || { echo "$c: the TLS hub did not serve its client" >&2; exit 1; }
  stop "$TARGET_PID"; rm -f "$W/t.qcow2"
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" sendense sendense_tls nbdcopy nbdcopy_tls nbdcopy_tuned nbdcopy_tuned_tls); do
      local mode=plain TGT=$PLAIN
      [[ $t == *_tls ]] && { mode=tls; TGT=$LTLS; }
      serve_hub "$W/t.qcow2" "$size" "$mode"
      case $t in
        sendense) measure "$c" "$t" "'$AGENT' copy --source '$SRC' --target '$PLAIN'" ;;
        sendense_tls) measure "$c" "$t" "'$AGENT' copy --tls-dir '$W/certs/client' --source '$SRC' --target '$TLS'" ;;
        nbdcopy|nbdcopy_tls) measure "$c" "$t" "nbdcopy --flush '$SRC' '$TGT'" ;;
        nbdcopy_tuned|nbdcopy_tuned_tls) measure "$c" "$t" "nbdcopy --flush --destination-is-zero $TUNED '$SRC' '$TGT'" ;;
      esac
      hub_cpu "$c" "$t"; stop "$TARGET_PID"; same "$W/tls.raw" "$W/t.qcow2" "$c/$t"; rm -f "$W/t.qcow2"
    done
  done
  stop "$SRC_PID"; rm -f "$W/tls.raw"
  # Data bytes that crossed the hub's connection (what the agent sent as data; zeroes go as
  # WRITE_ZEROES): the same for both of its modes.
  local data; data=$(sed -n 's/.*"data":\([0-9]*\).*/\1/p' "$W/$c.sendense_tls.out")
  note_rss "$c.sendense"; note_rss "$c.sendense_tls"
  local best; best=$(best_of "$c.nbdcopy_tls" "$c.nbdcopy_tuned_tls")
  local bplain=${best%_tls}
  local what="tls ${TLS_GIB}GiB, $((data >> 20)) MiB data" nb=${best#"$c".}
  # The cost: TLS throughput over plain throughput (= plain wall over TLS wall), for both.
  local cost ncost
  cost=$(calc "$(med "$c.sendense" 1) / $(med "$c.sendense_tls" 1)")
  ncost=$(calc "$(med "$bplain" 1) / $(med "$best" 1)")
  row "$what: throughput TLS/plain" "plain $(mib_txt "$c.sendense" "$data"); TLS $(mib_txt "$c.sendense_tls" "$data")" \
    "${nb%_tls} plain $(mib_txt "$bplain" "$data"); TLS $(mib_txt "$best" "$data"); its TLS/plain $ncost" \
    "$cost TLS/plain" "none (the cost, reported)" "shown"
  row "$what: CPU-s, copier + hub" "$(cpu_pair "$c.sendense" "$c.sendense_tls")" "${nb%_tls} $(cpu_pair "$bplain" "$best")" \
    "$(calc "$(med "$c.sendense_tls" 2) / $(med "$c.sendense" 2)") agent TLS/plain" "none (the cost, reported)" "shown"
  local ratio; ratio=$(calc "$(med "$best" 1) / $(med "$c.sendense_tls" 1)")
  row "$what: Sendense TLS vs nbdcopy TLS" "TLS $(mib_txt "$c.sendense_tls" "$data")" \
    "$nb $(mib_txt "$best" "$data"); default $(wall_txt "$c.nbdcopy_tls"), tuned $(wall_txt "$c.nbdcopy_tuned_tls")" \
    "$ratio x $nb" ">= 1.0 (no target; shown)" "$(verdict "$ratio >= 1.0")"
}

# --- restore: a restore point's QCOW2 chain into a raw file -----------------------------------
# The agent's restore starts qemu-nbd servers of its own (the chain read-only, the raw file
# writable) and kills them without waiting: under /usr/bin/time their CPU would be lost. Here
# the measuring process is a subreaper, so every process of a restore is reaped by it and
# counted, whoever started it. Appends "wall cpu rss_kib" like measure (rss: the largest
# process, servers included).
measure_all() { # case tool command
  python3 - "$W/time.tmp" "$3" > "$W/$1.$2.out" 2>>"$W/tools.log" <<'PY' \
    || { echo "$2 failed in case $1: $3" >&2; tail -5 "$W/tools.log" >&2; exit 1; }
import ctypes, os, resource, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp("bash", ["bash", "-c", sys.argv[2]])
_, status = os.waitpid(pid, 0)
wall = time.monotonic() - t0
# Orphaned servers are ours now; a killed one is gone within moments.
deadline = time.monotonic() + 30
while True:
    try:
        p, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if p == 0:
        if time.monotonic() > deadline:
            sys.exit("processes of the tool still running 30 s after it exited")
        time.sleep(0.01)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    print(f"{wall:.3f} {ru.ru_utime + ru.ru_stime:.3f} {ru.ru_maxrss}", file=f)
sys.exit(os.waitstatus_to_exitcode(status))
PY
  cat "$W/time.tmp" >> "$R/$1.$2"
}

# Bytes a file takes on its file system (its holes excluded).
allocated() { local b u; read -r b u < <(stat -c '%b %B' "$1"); echo $((b * u)); }

# A restore point of 6 links, as backups make it: a full base (qemu-img convert of a VM-shaped
# disk, 64 KiB clusters) and 5 incrementals, each 3% of the disk in 64 KiB changed areas (one
# in ten now zeros) written by the agent's incremental copy into a QCOW2 overlay served like
# the hub serves it. Then each tool restores the top of the chain into a new raw file.
restore_case() {
  local c=restore gib=$RESTORE_GIB size=$((RESTORE_GIB << 30)) links=6 pct=3
  log "$c: a ${gib} GiB disk's ${links}-link QCOW2 chain into a raw file in $W, $RUNS runs per tool"
  make_disk "$W/rs.raw" "$size" 71
  qemu-img convert -f raw -O qcow2 -o "$HUB_IMG" "$W/rs.raw" "$W/rs0.qcow2"
  serve_source "$W/rs.raw" "$W/rs.sock"
  local i count=$((size * pct / 100 / 65536))
  for i in $(seq $((links - 1))); do
    "$VMDISK" change --path "$W/rs.raw" --areas-out "$W/rs$i.areas" --count "$count" --length 65536 \
      --seed $((71 + i)) > "$W/rs$i.json"
    serve_target "$W/rs$i.qcow2" "-b $W/rs$((i - 1)).qcow2" "$W/ov.sock"
    "$AGENT" copy --kind incremental --areas-file "$W/rs$i.areas" --source "$(unix_url "$W/rs.sock")" \
      --target "$(unix_url "$W/ov.sock")" > /dev/null 2>>"$W/tools.log"
    stop "$TARGET_PID"
  done
  local top=$W/rs$((links - 1)).qcow2
  same "$W/rs.raw" "$top" "$c/chain"
  stop "$SRC_PID"; rm -f "$W/rs.raw"
  [ "$(qemu-img info -U --backing-chain "$top" | grep -c '^image:')" = "$links" ] \
    || { echo "$c: the chain does not have $links links" >&2; exit 1; }
  # Data bytes: what the chain holds allocated (zeros written by the guest included).
  local data; data=$(qemu-img map -U -f qcow2 --output=json "$top" \
    | python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
  log "$c: chain of $links links, $((data >> 20)) MiB data, files $(du -cm "$W"/rs?.qcow2 | tail -1 | cut -f1) MiB"
  local out=$W/out.raw nsock=$W/rn.sock
  for r in $(seq "$RUNS"); do
    for t in $(order "$r" sendense qemu_img_best qemu_img nbdcopy); do
      rm -f "$out" "$nsock"
      case $t in
        sendense) measure_all "$c" "$t" "'$AGENT' restore --source '2000:$top' --target '2000:file:$out'" ;;
        qemu_img_best) measure_all "$c" "$t" "qemu-img convert -f qcow2 -O raw -S 4k -m 8 -W '$top' '$out'" ;;
        qemu_img) measure_all "$c" "$t" "qemu-img convert -f qcow2 -O raw '$top' '$out'" ;;
        # The chain served like the agent serves it to itself; server start-up is timed too.
        nbdcopy) measure_all "$c" "$t" "qemu-nbd -r -f qcow2 --shared=8 --persistent -k '$nsock' '$top' & p=\$!
          for _ in \$(seq 1000); do [ -S '$nsock' ] && break; sleep 0.01; done
          nbdcopy --flush '$(unix_url "$nsock")' '$out'; rc=\$?; kill \$p; wait \$p; exit \$rc" ;;
      esac
      same "$out" "$top" "$c/$t"
      allocated "$out" >> "$R/$c.$t.alloc"
      rm -f "$out"
    done
  done
  rm -f "$W"/rs?.qcow2 "$W"/rs?.areas
  # The throughput ratio: the baseline's wall over the agent's.
  local best=$c.qemu_img_best ratio; ratio=$(calc "$(med "$best" 1) / $(med "$c.sendense" 1)")
  local what="restore ${gib}GiB ${links}-link chain to raw, $((data >> 20)) MiB data"
  local names=(qemu_img_best "qemu-img -m8 -W" qemu_img "qemu-img defaults" nbdcopy nbdcopy) k base=
  for ((k = 0; k < ${#names[@]}; k += 2)); do
    base+="${base:+; }${names[$((k + 1))]} disk $(mib_txt "$c.${names[$k]}" "$size"), data $(mib_txt "$c.${names[$k]}" "$data")"
  done
  row "$what: throughput" "disk $(mib_txt "$c.sendense" "$size"), data $(mib_txt "$c.sendense" "$data")" \
    "$base" "$ratio x qemu-img -m8 -W" ">= 0.8" "$(verdict "$ratio >= 0.8")"
  base=
  for ((k = 0; k < ${#names[@]}; k += 2)); do
    base+="${base:+; }${names[$((k + 1))]} $(cpu_txt "$c.${names[$k]}" "$gib"), $(rss_txt "$c.${names[$k]}")"
  done
  row "$what: CPU, RSS (servers included)" "$(cpu_txt "$c.sendense" "$gib"), $(rss_txt "$c.sendense")" "$base" \
    "$(calc "$(med "$c.sendense" 2) / $(med "$best" 2)") CPU x qemu-img -m8 -W" "none (shown)" "shown"
  # Sparse: the output takes no more than the chain holds as data (zeros and holes skipped).
  base=
  for ((k = 0; k < ${#names[@]}; k += 2)); do
    base+="${base:+; }${names[$((k + 1))]} $(($(sort -g "$R/$c.${names[$k]}.alloc" | tail -1) >> 20)) MiB"
  done
  local sa qa; sa=$(sort -g "$R/$c.sendense.alloc" | tail -1); qa=$(sort -g "$R/$best.alloc" | tail -1)
  row "$what: output allocated" "$((sa >> 20)) MiB" "$base" "$(calc "$sa / $data") x data, $(calc "$sa / $qa") x qemu-img -m8 -W" \
    "<= data" "$(verdict "$sa <= $data")"
}

echo "== bench started $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), quick=$Q runs=$RUNS" >&2
for case in $CASES; do
  case $case in
    full) full_case full "$W" "$FULL_GIB" ;;
    disk) full_case disk "$D" "$DISK_GIB" ;;
    three) three_case ;;
    sparse) sparse_case ;;
    scattered) scattered_case ;;
    wan) net_case wan20 10 "$WAN_MBIT" "$WAN_MIB"; net_case wan50 25 "$WAN_MBIT" "$WAN_MIB" ;;
    link) net_case link 10 100 "$LINK_MIB" ;;
    tls) tls_case ;;
    restore) restore_case ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
done
[ "$MAXRSS" -gt 0 ] && row "agent peak RSS, all cases" "$(awk -v k="$MAXRSS" 'BEGIN{printf "%.0f MiB", k/1024}')" "-" "-" "<= 256 MiB" "$(verdict "$MAXRSS <= 262144")"

echo
echo "== Sendense benchmark ($(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), quick=$Q, $RUNS runs per tool in rotation; median (min-max))"
{ printf 'case\tSendense\tbaselines\tratio\ttarget\tverdict\n'; cat "$TABLE"; } | column -t -s $'\t' -o ' | '
