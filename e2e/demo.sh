#!/usr/bin/env bash
# The demo (`make demo`): brings up the local control plane, installs Sendense's CRDs and applies
# the samples; then starts a simulated vCenter (vcsim-cbt, a 2-disk VM with changed-block
# tracking) and a node stand-in that runs the pods bound to it as processes, and installs
# Sendense the way users do: `helm upgrade --install` of charts/sendense. The operator then runs
# as a pod on the stand-in, as the chart's ServiceAccount with the chart's RBAC only (no admin
# credentials). Everything from there on is `kubectl apply`: a SourceNode, a Repository on a
# hostPath volume, a full BackupJob, guest writes, an incremental BackupJob. Each restore point is
# then read back through its QCOW2 chain and compared with the simulator's checksum of the disk
# at the backup. The release is uninstalled and the stand-in and simulator stop when the demo
# ends; the control plane stays up (`make cluster-down` stops it). Re-runnable: the demo's
# release and namespace are recreated on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/cluster/up.sh
source e2e/cluster/env.sh
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=30s "$@"; }
# kubectl wait bounds itself with --timeout; a request timeout would cut its watch short.
kw() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" wait "$@"; }
header() { echo; echo "=== $* ==="; }

echo; echo "=== installing the CRDs ==="
k apply --server-side -k config/crd
k wait --for=condition=Established --timeout=60s crd/sourcenodes.sendense.io crd/repositories.sendense.io crd/backupjobs.sendense.io
k get crd | grep -E 'NAME|sendense.io'

echo; echo "=== applying the samples to namespace sendense-demo ==="
k create namespace sendense-demo --dry-run=client -o yaml | k apply -f -
k apply -n sendense-demo -k config/samples
k get -n sendense-demo sourcenodes,repositories,backupjobs

echo; echo "=== admission rejects a malformed BackupJob, naming the field ==="
if k create -n sendense-demo -f e2e/invalid/01-backupjob-vm-name-and-uuid.yaml 2>&1; then
  echo "the malformed BackupJob was accepted: the CRDs are not validating" >&2; exit 1
fi

# ---------------------------------------------------------------------------------------------
# The backup demo: the node stand-in and the simulator run as local processes; the operator is
# installed with the Helm chart and runs as a pod on the stand-in.
NS=sendense-backup-demo
NODE=sendense-demo-node
RELEASE=sendense          # the chart's objects are named sendense-operator etc.
PV=$NS-repo
VM=cbt-vm-0
HUB_PORTS=(10600 10620)   # hub pods share the host network in the stand-in
JOB_TIMEOUT=300           # seconds a BackupJob may take to succeed
# One work directory per control plane, so demos on different control planes never collide.
W=$SENDENSE_CACHE/demo/$(basename "$STATE_DIR")
REPO=$W/repository
# The operator's pod runs as the chart's unprivileged user (65532), so the binaries the stand-in
# runs for pods must be readable by anyone: a copy outside root's home, one per control plane.
PODBIN=/var/tmp/sendense-demo-bin-$(basename "$STATE_DIR")
PIDS=()
STANDIN=
INSTALLED=
OPERATOR_POD=

stop() { # pid: SIGTERM, SIGKILL after 15 s
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 75); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  # The operator first (it would react to pods vanishing), then the node, then the vCenter.
  # Uninstalling the release while the stand-in still runs stops the operator's pod there
  # (foreground: the Deployment is gone only once its pod is); it also removes the chart's
  # cluster-scoped RBAC, which is named after the release.
  if [ -n "$INSTALLED" ]; then
    echo
    echo "uninstalling the release $RELEASE (its operator pod stops on the stand-in)..."
    local how=(--cascade foreground --wait --timeout 60s)
    kill -0 "$STANDIN" 2>/dev/null || how=(--timeout 60s)   # no node to stop the pod: no waiting
    helm uninstall "$RELEASE" --namespace "$NS" "${how[@]}" >/dev/null \
      || echo "  (helm uninstall failed; the next run retries it)" >&2
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
  rm -rf "$PODBIN"   # the pods' copies of the binaries (over a GiB)
  if [ -d "$W" ]; then
    echo
    echo "Operator uninstalled; node stand-in and simulator stopped. Logs in $W:"
    echo "  operator.log (a link to the operator pod's log), node-standin.log, vcsim.log;"
    echo "  every pod's container logs in node/$NODE/pods/<namespace>_<pod>_<uid>/logs/"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "building the operator, the agent, the node stand-in, the vCenter simulator and helm"
cargo build -q -p sendense-operator -p sendense-agent --bins
cargo build -q -p sendense-e2e --bin node-standin
BIN=$CARGO_TARGET_DIR/debug
AGENT=$BIN/sendense-agent
SIM=$(bash e2e/vcsim-cbt/build.sh | tail -n 1)
tools=$(bash e2e/tools/build.sh)   # HELM=..., KUBECONFORM=..., PROMTOOL=...
eval "$tools"
helm() { "$HELM" --kubeconfig "$KUBECONFIG_PATH" "$@"; }
rm -rf "$PODBIN"
mkdir -p "$PODBIN"
chmod 0755 "$PODBIN"
install -m 0755 "$BIN/sendense-operator" "$BIN/sendense-agent" "$PODBIN/"
echo "binaries in $BIN (pods run the copies in $PODBIN); simulator $SIM; helm $HELM"

header "a fresh namespace $NS (a previous run's release and namespace are deleted first)"
if k get namespace "$NS" >/dev/null 2>&1; then
  # A run that ended without uninstalling left its release: uninstall it, so its cluster-scoped
  # RBAC (named after the release) goes too. Its pods' node is gone, so no waiting for them.
  if timeout 90 "$HELM" --kubeconfig "$KUBECONFIG_PATH" uninstall "$RELEASE" --namespace "$NS" \
    --timeout 60s >/dev/null 2>&1; then
    echo "uninstalled the previous run's release $RELEASE"
  fi
  k delete namespace "$NS" --wait=false
  # Pods of an earlier run whose node is gone would keep the namespace terminating.
  k delete pods -n "$NS" --all --force --grace-period=0 >/dev/null 2>&1 || true
  kw --for=delete namespace/"$NS" --timeout=120s
fi
k delete pv "$PV" --ignore-not-found --timeout=60s
k create namespace "$NS"
rm -rf "$W"
mkdir -p "$W/manifests" "$REPO"

header "starting the vCenter simulator (VM $VM: disk 2000 of 256 MiB, disk 2001 of 128 MiB)"
"$SIM" serve -datastore-dir "$W/ds" -disk-size 256MiB,128MiB > "$W/vcsim.json" 2> "$W/vcsim.log" &
PIDS+=($!)
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }
deadline=$((SECONDS + 60))
until field "$W/vcsim.json" "d['url']" >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ] || ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
    echo "the simulator did not start; see $W/vcsim.log" >&2; tail -n 20 "$W/vcsim.log" >&2; exit 1
  fi
  sleep 0.1
done
export VCSIM_CBT_CONTROL VCSIM_CBT_VM=$VM
VCSIM_CBT_CONTROL=$(field "$W/vcsim.json" "d['control_url']")
URL=$(field "$W/vcsim.json" "d['url']")
TP=$(field "$W/vcsim.json" "d['thumbprint']")
USERNAME=$(field "$W/vcsim.json" "d['username']")
PASSWORD=$(field "$W/vcsim.json" "d['password']")
DS=$(field "$W/vcsim.json" "d['datastores']['LocalDS_0']")
echo "vCenter at $URL (thumbprint ${TP:0:23}...), datastore LocalDS_0 in $DS"

header "starting the node stand-in (node $NODE; runs the pods bound to it as processes)"
NO_COLOR=1 "$BIN/node-standin" --kubeconfig "$KUBECONFIG_PATH" --node "$NODE" --root "$W/node" --path "$PODBIN" \
  > "$W/node-standin.log" 2>&1 &
STANDIN=$!
PIDS+=("$STANDIN")
deadline=$((SECONDS + 60))
until [ "$(k get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; do
  if [ $SECONDS -ge $deadline ] || ! kill -0 "$STANDIN" 2>/dev/null; then
    echo "node $NODE did not become Ready; see $W/node-standin.log" >&2; tail -n 20 "$W/node-standin.log" >&2; exit 1
  fi
  sleep 0.5
done
k get node "$NODE"

header "installing Sendense with Helm (release $RELEASE in namespace $NS, watching $NS)"
METRICS_PORT=$(python3 -c '
import socket
for p in [18080] + [0]:
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", p)); print(s.getsockname()[1]); break
    except OSError:
        pass
    finally:
        s.close()')
operator_log() { # the operator pod's log on the stand-in (the newest, should there be several)
  local f
  f=$(find "$W/node" -path "*/pods/${NS}_$RELEASE-operator-*/logs/operator.log" -printf '%T@ %p\n' 2>/dev/null \
    | sort -n | tail -n 1 | cut -d' ' -f2- || true)
  echo "${f:-$W/node/$NODE/pods/${NS}_$RELEASE-operator-*/logs/operator.log}"
}
operator_tail() { # lines: the end of the operator's log, without its colours
  tail -n "$1" "$(operator_log)" | sed 's/\x1b\[[0-9;]*m//g'
}
operator_failed() { # what
  echo "$1" >&2
  k get deploy,pods -n "$NS" -o wide >&2 || true
  k describe pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE" >&2 || true
  echo "--- operator log (last 40 lines of $(operator_log))" >&2; operator_tail 40 >&2 || true
  echo "--- node stand-in log (last 20 lines)" >&2; tail -n 20 "$W/node-standin.log" >&2 || true
  exit 1
}
echo "+ helm upgrade --install $RELEASE charts/sendense --namespace $NS --set watchNamespace=$NS \\"
echo "    --set metrics.port=$METRICS_PORT --set vcenterProbeIntervalSeconds=10 \\"
echo "    --set repositoryProbeIntervalSeconds=3600 --wait --timeout 3m"
INSTALLED=1   # from here on, the exit uninstalls whatever got installed
if ! helm upgrade --install "$RELEASE" charts/sendense --namespace "$NS" \
  --set watchNamespace="$NS" --set metrics.port="$METRICS_PORT" \
  --set vcenterProbeIntervalSeconds=10 --set repositoryProbeIntervalSeconds=3600 \
  --wait --timeout 3m > "$W/helm-install.txt" 2>&1; then
  cat "$W/helm-install.txt" >&2
  operator_failed "helm upgrade --install did not succeed within 3m"
fi
sed '/^NOTES:/,$d' "$W/helm-install.txt"
echo "(the chart's NOTES for users are in $W/helm-install.txt)"
k get deploy,pods -n "$NS" -o wide
OPERATOR_POD=$(k get pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator" \
  -o jsonpath='{.items[0].metadata.name}')
[ -n "$OPERATOR_POD" ] || operator_failed "the release runs no operator pod"
OPERATOR_SA=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.spec.serviceAccountName}')
OPERATOR_UID=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.spec.securityContext.runAsUser}')
echo "operator pod $OPERATOR_POD runs as ServiceAccount $OPERATOR_SA (uid $OPERATOR_UID) with the chart's RBAC:"
k get clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator"
k get role,rolebinding -n "$NS" -l "app.kubernetes.io/instance=$RELEASE"
deadline=$((SECONDS + 60))
until curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null; do
  [ $SECONDS -lt $deadline ] || operator_failed "the operator's /readyz does not answer on port $METRICS_PORT after 60s"
  sleep 0.5
done
ln -sfn "$(operator_log)" "$W/operator.log"
echo "metrics on http://127.0.0.1:$METRICS_PORT/metrics, log $(operator_log)"

header "kubectl apply: credentials, SourceNode, repository volume and Repository"
cat > "$W/manifests/setup.yaml" <<EOF
apiVersion: v1
kind: Secret
metadata: {name: vcenter-credentials, namespace: $NS}
stringData: {username: "$USERNAME", password: "$PASSWORD"}
---
apiVersion: sendense.io/v1alpha1
kind: SourceNode
metadata: {name: vc, namespace: $NS}
spec:
  vcenter:
    url: "$URL"
    credentialsSecretRef: {name: vcenter-credentials}
    tls: {thumbprint: "$TP"}
  datacenter: DC0
  transport:
    type: nfs
    nfs:
      datastores: [{name: LocalDS_0, hostPath: {path: "$DS"}}]
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $PV}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: "$REPO"}
  claimRef: {namespace: $NS, name: backups}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: backups, namespace: $NS}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: $PV
  resources: {requests: {storage: 2Gi}}
---
apiVersion: sendense.io/v1alpha1
kind: Repository
metadata: {name: primary, namespace: $NS}
spec:
  storage: {persistentVolumeClaim: {claimName: backups}}
  hub: {portRange: {low: ${HUB_PORTS[0]}, high: ${HUB_PORTS[1]}}}
EOF
k apply -f "$W/manifests/setup.yaml"
echo "(manifests in $W/manifests/setup.yaml)"
echo "waiting for the operator to log in to the vCenter and to probe the repository volume..."
if ! kw -n "$NS" --for=condition=Ready --timeout=120s sourcenode/vc repository/primary; then
  k describe -n "$NS" sourcenode/vc repository/primary >&2 || true
  echo "--- operator log (last 40 lines of $(operator_log))" >&2; operator_tail 40 >&2; exit 1
fi
k get -n "$NS" sourcenode/vc repository/primary

guest() { "$SIM" "$@" > /dev/null; }
sums() { # the simulator's SHA-256 of both disks, "<2000> <2001>"
  local key
  for key in 2000 2001; do
    "$SIM" checksum -disk "$key" | python3 -c "import json,sys; print(json.load(sys.stdin)['sha256'])"
  done | paste -sd ' '
}
job_failed() { # name why
  echo >&2
  echo "BackupJob $1 $2" >&2
  echo "--- kubectl describe backupjob $1" >&2
  k describe -n "$NS" backupjob "$1" >&2 || true
  echo "--- operator log (last 40 lines of $(operator_log))" >&2
  operator_tail 40 >&2 || true
  local log
  while IFS= read -r log; do
    echo "--- ${log#"$W"/} (last 15 lines)" >&2; tail -n 15 "$log" >&2
  done < <(find "$W/node" -name '*.log' -path "*${NS}_$1-*" 2>/dev/null | sort)
  exit 1
}
run_job() { # name mode: applies a BackupJob and waits (bounded) for it to succeed
  local name=$1 mode=$2 deadline=$((SECONDS + JOB_TIMEOUT)) line last="" phase restarts
  cat > "$W/manifests/$name.yaml" <<EOF
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {name: $name, namespace: $NS}
spec:
  vm: {name: $VM}
  sourceNodeRef: {name: vc}
  repositoryRef: {name: primary}
  mode: $mode
EOF
  sed 's/^/  | /' "$W/manifests/$name.yaml"
  k apply -f "$W/manifests/$name.yaml"
  while :; do
    line=$(k get -n "$NS" backupjob "$name" -o jsonpath='{.status.phase} {.status.progress} {.status.size}' 2>/dev/null || true)
    phase=${line%% *}
    line=${line%"${line##*[! ]}"}   # no trailing blanks while progress and size are unset
    if [ -n "$line" ] && [ "$line" != "$last" ]; then echo "  $name: $line"; last=$line; fi
    case $phase in
      Succeeded) return 0 ;;
      Failed) job_failed "$name" "ended Failed" ;;
    esac
    kill -0 "$STANDIN" 2>/dev/null || job_failed "$name" "was left unfinished: the node stand-in exited"
    restarts=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.status.containerStatuses[0].restartCount}' 2>/dev/null || true)
    [ "${restarts:-0}" = 0 ] || job_failed "$name" "was left unfinished: the operator exited (its container restarted $restarts time(s))"
    [ $SECONDS -lt "$deadline" ] || job_failed "$name" "did not succeed within ${JOB_TIMEOUT}s (phase: ${phase:-none})"
    sleep 1
  done
}

header "the guest writes its first data: 100 MiB at random places on disk 2000, 40 MiB on disk 2001"
guest fill -disk 2000 -pattern random -seed 1 -count 400 -size 256K
guest fill -disk 2001 -pattern sequential -seed 2 -count 40 -size 1M -offset 16M

header "BackupJob backup-1, mode full"
run_job backup-1 full
s=$(sums); read -r F0 F1 <<< "$s"   # the VM is idle: the disks are as at the job's snapshot

header "the guest changes 1,000 scattered 4 KiB blocks on disk 2000 and zeroes 8 MiB of disk 2001"
guest fill -disk 2000 -pattern fragmented -seed 3 -count 1000 -size 4K -offset 8M
guest zero -disk 2001 -offset 20M -length 8M

header "BackupJob backup-2, mode auto (incremental on top of backup-1)"
run_job backup-2 auto
s=$(sums); read -r I0 I1 <<< "$s"

header "kubectl get backupjobs -o wide"
k get -n "$NS" backupjobs -o wide

header "per disk: how each was copied, into which file, from which changeId to which"
k get -n "$NS" backupjobs -o json > "$W/backupjobs.json"
python3 - "$W/backupjobs.json" <<'PY'
import json, sys

def cid(c):  # "52 8f ... cc/7" -> "52 8f 3a 0c.../7"; "*" stays
    if not c or "/" not in c:
        return c or "-"
    u, n = c.rsplit("/", 1)
    return f"{u[:11]}.../{n}"

rows = [("JOB", "DISK", "COPY", "REASON", "FILE", "CHANGEID USED -> REACHED", "COPIED")]
for j in json.load(open(sys.argv[1]))["items"]:
    st = j.get("status", {})
    for d in st.get("disks", []):
        rows.append((j["metadata"]["name"], str(d["deviceKey"]), d.get("copy", "-"),
                     d.get("copyReason", "-"), d.get("file", "-"),
                     f'{cid(d.get("changeIdUsed"))} -> {cid(d.get("changeIdReached"))}',
                     f'{d.get("bytesCopied", 0) / 2**20:.1f} MiB'))
w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
for j in json.load(open(sys.argv[1]))["items"]:
    st = j.get("status", {})
    s = st.get("snapshot") or {}
    print(f'  {j["metadata"]["name"]}: snapshot {s.get("name")} ({s.get("id")}) removed: {s.get("removed")}; '
          f'chain parent: {st.get("chainParent", "-")}; attempts: {st.get("attempts")}')
PY
python3 - "$W/backupjobs.json" <<'PY'
import json, sys
jobs = {j["metadata"]["name"]: j.get("status", {}) for j in json.load(open(sys.argv[1]))["items"]}
want = {"backup-1": "Full", "backup-2": "Incremental"}
bad = [(n, d["deviceKey"], d.get("copy")) for n, k in want.items()
       for d in jobs.get(n, {}).get("disks", []) if d.get("copy") != k]
if bad or any(len(jobs.get(n, {}).get("disks", [])) != 2 for n in want):
    sys.exit(f"unexpected copy kinds (want backup-1 Full, backup-2 Incremental on both disks): {bad}")
PY

header "Events of the BackupJobs"
k get events -n "$NS" --field-selector involvedObject.kind=BackupJob --sort-by=.metadata.creationTimestamp \
  -o custom-columns='OBJECT:.involvedObject.name,TYPE:.type,REASON:.reason,MESSAGE:.message'

header "restoring every restore point through its QCOW2 chain and comparing with the source"
deadline=$((SECONDS + 90))
while [ -n "$(k get pods -n "$NS" -l sendense.io/backupjob -o name 2>/dev/null)" ]; do
  if [ $SECONDS -ge $deadline ]; then
    echo "pods of the jobs still there after 90s:" >&2; k get pods -n "$NS" -l sendense.io/backupjob >&2; exit 1
  fi
  sleep 0.5
done
echo "  (the jobs' hub and agent pods are gone, so no qemu-nbd holds the files)"
verify() { # job key expected
  local file
  file=$(k get -n "$NS" backupjob "$1" -o jsonpath="{.status.disks[?(@.deviceKey==$2)].file}")
  [ -n "$file" ] || { echo "  BackupJob $1 names no file for disk $2" >&2; exit 1; }
  if "$AGENT" verify --file "$REPO/$file" --sha256 "$3" > "$W/verify.log" 2>&1; then
    echo "  $1 disk $2: $file is identical to the disk at its backup (sha256 ${3:0:16}...)"
  else
    echo "  $1 disk $2: $file DIFFERS from the source" >&2; cat "$W/verify.log" >&2; exit 1
  fi
}
verify backup-1 2000 "$F0"; verify backup-1 2001 "$F1"
verify backup-2 2000 "$I0"; verify backup-2 2001 "$I1"
snapshots=$("$SIM" snapshots | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
echo "  snapshots left on $VM: $snapshots"
[ "$snapshots" = 0 ] || { echo "the backups left $snapshots snapshot(s) on $VM" >&2; exit 1; }

header "the Repository and its restore points"
deadline=$((SECONDS + 60))
until [ "$(k get -n "$NS" repository primary -o jsonpath='{.status.restorePoints}')" = 2 ]; do
  if [ $SECONDS -ge $deadline ]; then
    echo "the Repository does not count 2 restore points after 60s" >&2; k get -n "$NS" repository primary -o yaml >&2; exit 1
  fi
  sleep 0.5
done
k get -n "$NS" repository primary
echo "  files in the repository volume ($REPO):"
(cd "$REPO" && find . -name '*.qcow2' -printf '%P\n' | sort | while IFS= read -r f; do
  backing=$(qemu-img info -U --output=json "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))')
  printf '    %-60s %6s on disk%s\n' "$f" "$(du -h "$f" | cut -f1)" "${backing:+, backed by $backing}"
done)
echo "  operator metrics:"
curl -sf --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^sendense_backups_total' | sed 's/^/    /' || true

echo
echo "Demo done. The control plane is still up:"
echo "  export KUBECONFIG=$KUBECONFIG_PATH"
echo "  $KUBECTL get backupjobs,sourcenodes,repositories -n $NS"
echo "Stop it with: make cluster-down"
