#!/usr/bin/env bash
# The backup part of the demo: the simulated vCenter (vcsim-cbt) with a 2-disk VM, a hub of
# QCOW2 files served by qemu-nbd, and the agent taking a full and then an incremental backup;
# each restore point is read back through its QCOW2 chain and checked against the simulator's
# checksum of the disks at the snapshot instant. (The operator will drive exactly these steps
# from BackupJobs; until it lands, the demo runs the agent itself.)
set -euo pipefail
cd "$(dirname "$0")/.."
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
W=$SENDENSE_CACHE/demo-backup
rm -rf "$W"; mkdir -p "$W/repo"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cargo build -q -p sendense-agent --bin sendense-agent
AGENT=$CARGO_TARGET_DIR/debug/sendense-agent
SIM=$(bash e2e/vcsim-cbt/build.sh)
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }

"$SIM" serve -datastore-dir "$W/ds" -disk-size 256MiB,128MiB > "$W/sim.json" 2> "$W/sim.log" &
PIDS+=($!)
for _ in $(seq 300); do [ -s "$W/sim.json" ] && break; sleep 0.1; done
[ -s "$W/sim.json" ] || { echo "the simulator did not start; see $W/sim.log" >&2; exit 1; }
export VCSIM_CBT_CONTROL=$(field "$W/sim.json" "d['control_url']")
URL=$(field "$W/sim.json" "d['url']"); TP=$(field "$W/sim.json" "d['thumbprint']")
export SENDENSE_VCENTER_USERNAME=$(field "$W/sim.json" "d['username']")
export SENDENSE_VCENTER_PASSWORD=$(field "$W/sim.json" "d['password']")
DS=$(field "$W/sim.json" "d['datastores']['LocalDS_0']")
echo "vCenter simulator at $URL (VM cbt-vm-0: disks 2000 of 256 MiB and 2001 of 128 MiB)"

guest() { "$SIM" "$@" > /dev/null; }
sum() { "$SIM" checksum -disk "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['sha256'])"; }

backup() { # job parent
  local job=$1 parent=${2:-} targets="" bases="" key size
  for key in 2000 2001; do
    size=$([ $key = 2000 ] && echo $((256 << 20)) || echo $((128 << 20)))
    "$AGENT" hub prepare --file "$W/repo/$key/$job.qcow2" --size "$size" ${parent:+--backing "$W/repo/$key/$parent.qcow2"} > /dev/null
    qemu-nbd -f qcow2 -t --shared=8 -k "$W/$job-$key.sock" "$W/repo/$key/$job.qcow2" 2>>"$W/hub.log" &
    PIDS+=($!)
    targets+="${targets:+,}$key:nbd+unix:///?socket=$W/$job-$key.sock"
    [ -n "$parent" ] && bases+="${bases:+,}$key:$(field "$W/$parent.json" "[x for x in d['disks'] if x['key']==$key][0]['change_id_reached']")"
  done
  for key in 2000 2001; do for _ in $(seq 100); do [ -S "$W/$job-$key.sock" ] && break; sleep 0.05; done; done
  "$AGENT" backup --vcenter "$URL" --thumbprint "$TP" --datacenter DC0 --vm cbt-vm-0 --job "$job" \
    --datastore "LocalDS_0=$DS" --targets "$targets" ${bases:+--base-change-ids "$bases"} > "$W/$job.json" 2>>"$W/agent.log"
  python3 - "$W/$job.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  snapshot {r['snapshot']['name']} ({r['snapshot']['id']}) removed: {r['snapshot']['removed']}")
for d in r["disks"]:
    print(f"  disk {d['key']}: {d['copy']:<11} {d['bytes_to_copy'] >> 20:>4} MiB in {d['areas']:>4} areas, "
          f"{d['bytes_written'] >> 20} MiB data + {d['bytes_zeroed'] >> 20} MiB zeros written; changeId {d['change_id_reached']}")
PY
  kill "${PIDS[@]: -2}" 2>/dev/null || true
}

verify() { # job key expected
  "$AGENT" verify --file "$W/repo/$2/$1.qcow2" --sha256 "$3" > /dev/null \
    && echo "  restore point $1 disk $2: identical to the disk at its snapshot ($3)" \
    || { echo "  restore point $1 disk $2 DIFFERS from the source" >&2; exit 1; }
}

echo; echo "=== the guest writes its first data; full backup"
guest fill -disk 2000 -pattern random -seed 1 -count 400 -size 256K
guest fill -disk 2001 -pattern sequential -seed 2 -count 40 -size 1M -offset 16M
F0=$(sum 2000); F1=$(sum 2001)
backup full

echo; echo "=== the guest changes 1,000 scattered blocks and zeroes a range; incremental backup"
guest fill -disk 2000 -pattern fragmented -seed 3 -count 1000 -size 4K -offset 8M
guest zero -disk 2001 -offset 20M -length 8M
I0=$(sum 2000); I1=$(sum 2001)
backup incr full

echo; echo "=== restoring both restore points through their QCOW2 chains and comparing"
verify full 2000 "$F0"; verify full 2001 "$F1"
verify incr 2000 "$I0"; verify incr 2001 "$I1"
echo "  snapshots left on the VM: $("$SIM" snapshots | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
echo "  chain of disk 2000: $(qemu-img info --backing-chain -U "$W/repo/2000/incr.qcow2" | grep -c '^image:') files"
