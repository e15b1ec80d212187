#!/usr/bin/env bash
# The operator's end-to-end test binaries (operator/tests/*.rs), two at a time: each test brings
# its own simulator, namespace, Repository and operator process (watching only that namespace),
# so tests of different binaries do not share state (tests within a binary still run one at a
# time, SERIAL). Most of their time is spent waiting on the system under test (deadlines,
# retries, a frozen vCenter), so two lanes nearly halve the wall time on two cores. What reaches
# beyond its own namespace runs alone afterwards: chart.rs (its all-namespaces install reconciles
# every namespace's SourceNodes with its own settings: beside secrets.rs it rewrote that test's
# SourceNodes NotAllowed) and the one test that stops the node's kubelet (every pod stalls).
#
# Run by e2e/run-tests.sh with the cluster up, KUBECONFIG, KUBECTL, HELM, KUBECONFORM and
# PROMTOOL exported. SENDENSE_TEST_LANES=1 runs them one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LANES=${SENDENSE_TEST_LANES:-2}
# The test that takes the node away (faults.rs): never beside another.
NODE_TEST=the_hubs_node_gone_mid_copy_its_pods_are_force_deleted_and_a_later_attempt_commits
# Longest first, so the lanes end together (as measured on 2026-11-27: vcenter_outage 728 s,
# faults 570 s without the node test, backup_job 346 s, then 170 s or less each).
ORDER="vcenter_outage faults backup_job disk_changes random_kills retention schedule restore_job nbd_tls source_node secrets"
# Whole binaries that run alone, after the lanes.
ALONE="chart"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Build once; cargo names each test binary ("Executable tests/x.rs (path)").
if ! cargo test -p sendense-operator --test '*' --locked --no-run 2>"$logs/build"; then
  cat "$logs/build" >&2
  exit 1
fi
grep -v '^ *Executable' "$logs/build" || true
declare -A BIN
while read -r _ src path; do
  name=$(basename "$src" .rs)
  BIN[$name]=${path//[()]/}
done < <(grep '^ *Executable tests/' "$logs/build")
[ "${#BIN[@]}" -gt 0 ] || { echo "no operator test binaries were built" >&2; exit 1; }

# Every binary runs, in ORDER first, then any not named there.
names=()
for n in $ORDER; do [ -n "${BIN[$n]:-}" ] && names+=("$n"); done
for n in "${!BIN[@]}"; do
  case " ${names[*]} $ALONE " in *" $n "*) ;; *) names+=("$n") ;; esac
done
alone=()
for n in $ALONE; do [ -n "${BIN[$n]:-}" ] && alone+=("$n"); done

# One binary, as cargo would run it (working directory and CARGO_MANIFEST_DIR the package's).
run_one() {
  local name=$1; shift
  local start=$SECONDS rc=0
  (cd "$ROOT/operator" && CARGO_MANIFEST_DIR=$ROOT/operator CARGO_PKG_NAME=sendense-operator \
    "${BIN[$name]}" "$@") >"$logs/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$logs/$name.rc"
  local shown=operator/tests/$name.rs
  [ "$name" != faults-node ] || shown="operator/tests/faults.rs $NODE_TEST"
  echo "--- $shown: exit $rc in $((SECONDS - start)) s"
}

pids=()
lane() {
  # Each lane takes the next binary off the shared list until none is left.
  local lock=$logs/queue.lock
  while true; do
    local i
    i=$(flock "$lock" bash -c 'n=$(cat "$1" 2>/dev/null || echo 0); echo $((n + 1)) >"$1"; echo "$n"' _ "$logs/queue")
    [ "$i" -lt "${#names[@]}" ] || return 0
    local name=${names[$i]}
    if [ "$name" = faults ]; then
      run_one "$name" --skip "$NODE_TEST"
    else
      run_one "$name"
    fi
  done
}
for _ in $(seq "$LANES"); do
  lane &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done

# What reaches beyond its namespace, alone: the all-namespaces install, the node-taking test.
for n in "${alone[@]}"; do run_one "$n"; done
BIN[faults-node]=${BIN[faults]}
run_one faults-node --exact "$NODE_TEST"

failed=()
for n in "${names[@]}" "${alone[@]}" faults-node; do
  echo
  if [ "$n" = faults-node ]; then
    echo "=== operator/tests/faults.rs: $NODE_TEST, alone ==="
  else
    echo "=== operator/tests/$n.rs ==="
  fi
  cat "$logs/$n.log"
  [ "$(cat "$logs/$n.rc" 2>/dev/null || echo 1)" = 0 ] || failed+=("$n")
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "operator tests failed: ${failed[*]}" >&2
  exit 1
fi
echo "operator tests: all $((${#names[@]} + ${#alone[@]})) binaries passed"
