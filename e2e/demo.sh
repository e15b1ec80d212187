#!/usr/bin/env bash
# The demo (`make demo`): brings up the local control plane with its real node (containerd,
# kubelet, kube-proxy; e2e/cluster/up.sh), installs Sendense's CRDs and applies the samples;
# builds the operator and agent images (release profile; SENDENSE_IMAGE_PROFILE=dev for an
# unoptimised build) and loads them into the node, as no registry is reachable here; starts a
# simulated vCenter (vcsim-cbt, a 2-disk VM with changed-block tracking) on the node's address,
# as the agent image's user (65532: its 0600 disk files look to the agent as an all_squash
# export shows them), and installs Sendense the way users do: `helm upgrade --install` of charts/sendense, the images
# never pulled. The operator then runs as a container on the node, as the chart's ServiceAccount
# with the chart's RBAC only, in a namespace that enforces the `restricted` Pod Security
# Standard. Everything from there on is `kubectl apply`: a SourceNode whose datastore reaches
# the agent through a read-only claim (a pod may not use hostPath there; a PersistentVolume may),
# a Repository on a `local` PersistentVolume of the node (owned by the pods' user through
# fsGroup), a full BackupJob, guest writes, an incremental BackupJob. While the full backup runs,
# the demo looks into its hub and agent containers (`kubectl exec`, `kubectl logs`). Each restore
# point is then read back through its QCOW2 chain and compared with the simulator's checksum of
# the disk at the backup. The release is uninstalled and the simulator stops when the demo ends;
# the control plane and node stay up (`make cluster-down` stops them). Re-runnable: the demo's
# release, namespace and PersistentVolumes are recreated on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_START=$SECONDS
# The node without a taint: the operator's pods (hub, agent, probe) schedule onto it like on any
# cluster, with no toleration. (A node an earlier run left tainted is untainted below.)
export SENDENSE_NODE_TAINT=
if [ "${SENDENSE_NODE:-1}" = 0 ]; then
  echo "the demo runs its pods on the real node: unset SENDENSE_NODE=0" >&2; exit 1
fi
bash e2e/cluster/up.sh
source e2e/cluster/env.sh
export SENDENSE_CACHE=${SENDENSE_CACHE:-$HOME/.cache/sendense}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SENDENSE_CACHE/target}
# The images users get are optimised; dev builds in a fraction of the time of a cold release.
export SENDENSE_IMAGE_PROFILE=${SENDENSE_IMAGE_PROFILE:-release}
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=30s "$@"; }
# kubectl wait bounds itself with --timeout; a request timeout would cut its watch short.
kw() { "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" wait "$@"; }
header() { echo; echo "=== $* ==="; }
nocolor() { sed 's/\x1b\[[0-9;]*m//g'; }

echo; echo "=== installing the CRDs ==="
k apply --server-side -k config/crd
k wait --for=condition=Established --timeout=60s crd/sourcenodes.sendense.io crd/repositories.sendense.io crd/backupjobs.sendense.io crd/restorepoints.sendense.io crd/restorejobs.sendense.io
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
# The backup demo: the operator, installed with the Helm chart, and every pod it creates run as
# containers on the real node; the vCenter simulator runs as a local process.
NS=sendense-backup-demo
RELEASE=sendense          # the chart's objects are named sendense-operator etc.
PV=$NS-repo               # the repository: a `local` PersistentVolume on the node
PV_DS=$NS-ds              # the simulator's datastore: a read-only hostPath PersistentVolume
RESTORE=web-back          # the RestoreJob; its claims are web-back-disk-<key>
PV_R=$NS-restored         # the restored disks' `local` PersistentVolumes: $PV_R-<key>
VM=cbt-vm-0
JOB_TIMEOUT=300           # seconds a BackupJob may take to succeed
# One work directory per control plane, so demos on different control planes never collide.
W=$SENDENSE_CACHE/demo/$(basename "$STATE_DIR")
REPO=$W/repository
# The simulator runs as the agent image's user, 65532: like ESXi it writes disk files with mode
# 0600, and a datastore export squashing every client to one user (all_squash,anonuid=65532)
# looks the same to the non-root agent. That user cannot enter root's home, so its binary (a
# copy) and its datastore are here.
VC_DIR=/var/tmp/sendense-demo-vcenter-$(basename "$STATE_DIR")
DATASTORE_USER=65532
SIM_PID=
INSTALLED=
DONE=
OPERATOR_POD=

stop() { # pid: SIGTERM, SIGKILL after 15 s
  local pid=$1 _
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # The operator first (it would react to the vCenter vanishing), then the vCenter. The
  # operator's log goes with its pod: kept in the work directory first. Uninstalling also
  # removes the chart's cluster-scoped RBAC, which is named after the release; --wait returns
  # once the kubelet has stopped the operator's container.
  if [ -n "$INSTALLED" ]; then
    [ -z "$OPERATOR_POD" ] || k logs -n "$NS" "$OPERATOR_POD" 2>/dev/null | nocolor > "$W/operator.log" || true
    echo
    echo "uninstalling the release $RELEASE (the kubelet stops the operator's container)..."
    timeout 90 "$HELM" --kubeconfig "$KUBECONFIG_PATH" uninstall "$RELEASE" --namespace "$NS" \
      --wait --timeout 60s >/dev/null || echo "  (helm uninstall failed; the next run retries it)" >&2
  fi
  [ -z "$SIM_PID" ] || stop "$SIM_PID"
  rm -rf "$VC_DIR"   # the simulated datastore: the VM's disks and the simulator's copy
  if [ -d "$W" ]; then
    echo
    echo "Operator uninstalled, simulator stopped and its datastore removed. In $W:"
    echo "  operator.log, vcsim.log, the manifests applied (manifests/) and the repository (repository/)"
  fi
  echo
  if [ -n "$DONE" ] && [ "$rc" = 0 ]; then
    echo "Demo done in $((SECONDS - DEMO_START)) s. The control plane and node $NODE_NAME are still up:"
  else
    echo "The demo FAILED after $((SECONDS - DEMO_START)) s (exit $rc). The control plane and node $NODE_NAME are still up:"
  fi
  echo "  export KUBECONFIG=$KUBECONFIG_PATH"
  echo "  $KUBECTL get backupjobs,sourcenodes,repositories,pods -n $NS"
  echo "Stop them with: make cluster-down"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "node $NODE_NAME: real containers (containerd, kubelet), no taint"
# A node an earlier demo or test left running was registered with the taint (up.sh leaves a
# healthy node alone, and a taint is only set at registration): removed here.
if grep -qxF sendense.io/real-node <<<"$(k get node "$NODE_NAME" -o jsonpath='{range .spec.taints[*]}{.key}{"\n"}{end}')"; then
  k taint node "$NODE_NAME" sendense.io/real-node- >/dev/null
  echo "removed the taint sendense.io/real-node (the node was started with it)"
fi
NODE_IP=$(k get node "$NODE_NAME" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
[ -n "$NODE_IP" ] || { echo "node $NODE_NAME has no InternalIP" >&2; exit 1; }
k get node "$NODE_NAME" -o wide

header "building the operator and agent images ($SENDENSE_IMAGE_PROFILE profile), the simulator and helm"
t=$SECONDS
images=$(bash e2e/images/build.sh operator agent)
echo "images built in $((SECONDS - t)) s; loading them into node $NODE_NAME (no registry: never pulled)"
t=$SECONDS
load_log=$(mktemp)
while read -r name archive ref; do
  bash e2e/cluster/node-load.sh "$archive" < /dev/null 2> "$load_log" \
    || { cat "$load_log" >&2; echo "loading $archive into the node failed" >&2; exit 1; }
  python3 - "$name" "$ref" "$archive.json" <<'PY'
import json, sys
name, ref, meta = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
print(f"  {name:8} {ref}  archive {meta['archiveSize'] / 2**20:.1f} MiB, unpacked {meta['unpackedSize'] / 2**20:.1f} MiB, "
      f"manifest {meta['manifest'][:19]}...")
PY
done <<< "$images"
rm -f "$load_log"
echo "loaded in $((SECONDS - t)) s"
OPERATOR_REF=$(awk '$1 == "operator" {print $3}' <<< "$images")
AGENT_REF=$(awk '$1 == "agent" {print $3}' <<< "$images")
# The restore points are verified on this machine with the agent of the image (static binary).
case $SENDENSE_IMAGE_PROFILE in release) profile_dir=release ;; *) profile_dir=debug ;; esac
AGENT=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/$profile_dir/sendense-agent
[ -x "$AGENT" ] || { echo "$AGENT is missing after the image build" >&2; exit 1; }
SIM=$(bash e2e/vcsim-cbt/build.sh | tail -n 1)
tools=$(bash e2e/tools/build.sh)   # HELM=..., KUBECONFORM=..., PROMTOOL=...
eval "$tools"
helm() { "$HELM" --kubeconfig "$KUBECONFIG_PATH" "$@"; }
echo "simulator $SIM; helm $HELM"

header "a fresh namespace $NS enforcing Pod Security 'restricted' (a previous run's release, namespace and volumes are deleted first)"
if k get namespace "$NS" >/dev/null 2>&1; then
  # A run that ended without uninstalling left its release: uninstall it, so its cluster-scoped
  # RBAC (named after the release) goes too.
  if timeout 90 "$HELM" --kubeconfig "$KUBECONFIG_PATH" uninstall "$RELEASE" --namespace "$NS" \
    --wait --timeout 60s >/dev/null 2>&1; then
    echo "uninstalled the previous run's release $RELEASE"
  fi
  k delete namespace "$NS" --wait=false
  # Pods of an earlier run on a node that is gone would keep the namespace terminating.
  k delete pods -n "$NS" --all --force --grace-period=0 >/dev/null 2>&1 || true
  kw --for=delete namespace/"$NS" --timeout=120s
fi
k delete pv "$PV" "$PV_DS" "$PV_R-2000" "$PV_R-2001" --ignore-not-found --timeout=60s
k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
EOF
rm -rf "$W" "$VC_DIR"
mkdir -p "$W/manifests" "$REPO" "$VC_DIR/ds"
chmod 0755 "$VC_DIR"
install -m 0755 "$SIM" "$VC_DIR/vcsim-cbt"
chown "$DATASTORE_USER:$DATASTORE_USER" "$VC_DIR/ds"

header "starting the vCenter simulator on the node's address $NODE_IP as uid $DATASTORE_USER (VM $VM: disk 2000 of 256 MiB, disk 2001 of 128 MiB)"
# Pods reach the host at the node's InternalIP, not at 127.0.0.1; the control API (guest writes,
# checksums) is for this script only.
setpriv --reuid "$DATASTORE_USER" --regid "$DATASTORE_USER" --clear-groups \
  "$VC_DIR/vcsim-cbt" serve -datastore-dir "$VC_DIR/ds" -disk-size 256MiB,128MiB \
  -listen "$NODE_IP:0" -tls-host "$NODE_IP" -control-listen 127.0.0.1:0 > "$W/vcsim.json" 2> "$W/vcsim.log" &
SIM_PID=$!
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }
deadline=$((SECONDS + 60))
until field "$W/vcsim.json" "d['url']" >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ] || ! kill -0 "$SIM_PID" 2>/dev/null; then
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
echo "  the VM's files belong to uid $DATASTORE_USER: $(stat -c '%A %u:%g %n' "$DS/$VM")"

header "installing Sendense with Helm (release $RELEASE in namespace $NS, watching $NS)"
operator_tail() { # lines: the end of the operator's log, without its colours
  [ -n "$OPERATOR_POD" ] || return 0
  k logs -n "$NS" "$OPERATOR_POD" --tail="$1" 2>&1 | nocolor
}
operator_failed() { # what
  echo "$1" >&2
  k get deploy,pods -n "$NS" -o wide >&2 || true
  k describe pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE" >&2 || true
  k get events -n "$NS" --sort-by=.metadata.creationTimestamp >&2 || true
  echo "--- kubectl logs (operator, last 40 lines)" >&2; operator_tail 40 >&2 || true
  exit 1
}
echo "+ helm upgrade --install $RELEASE charts/sendense --namespace $NS --set watchNamespace=$NS \\"
echo "    --set image.pullPolicy=Never --set agentImage.pullPolicy=Never --set vcenterProbeIntervalSeconds=10 \\"
echo "    --set repositoryProbeIntervalSeconds=3600 --wait --timeout 3m"
INSTALLED=1   # from here on, the exit uninstalls whatever got installed
t=$SECONDS
if ! helm upgrade --install "$RELEASE" charts/sendense --namespace "$NS" \
  --set watchNamespace="$NS" --set image.pullPolicy=Never --set agentImage.pullPolicy=Never \
  --set vcenterProbeIntervalSeconds=10 --set repositoryProbeIntervalSeconds=3600 \
  --wait --timeout 3m > "$W/helm-install.txt" 2>&1; then
  cat "$W/helm-install.txt" >&2
  OPERATOR_POD=$(k get pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator" \
    -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  operator_failed "helm upgrade --install did not succeed within 3m"
fi
sed '/^NOTES:/,$d' "$W/helm-install.txt"
echo "(installed and Ready in $((SECONDS - t)) s; the chart's NOTES for users are in $W/helm-install.txt)"
OPERATOR_POD=$(k get pods -n "$NS" -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator" \
  -o jsonpath='{.items[0].metadata.name}')
[ -n "$OPERATOR_POD" ] || operator_failed "the release runs no operator pod"
k get pods -n "$NS" -o wide
k get pod -n "$NS" "$OPERATOR_POD" -o custom-columns='CONTAINER:.status.containerStatuses[0].containerID,IMAGE:.status.containerStatuses[0].image,IMAGE ID:.status.containerStatuses[0].imageID'
running=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.status.containerStatuses[0].image}')
[ "$running" = "$OPERATOR_REF" ] || operator_failed "the operator pod runs $running, not the image loaded ($OPERATOR_REF)"
OPERATOR_SA=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.spec.serviceAccountName}')
OPERATOR_UID=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.spec.securityContext.runAsUser}')
OPERATOR_IP=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.status.podIP}')
echo "operator pod $OPERATOR_POD runs as ServiceAccount $OPERATOR_SA (uid $OPERATOR_UID) with the chart's RBAC:"
k get clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=operator"
k get role,rolebinding -n "$NS" -l "app.kubernetes.io/instance=$RELEASE"
deadline=$((SECONDS + 60))
until curl -sf --max-time 2 "http://$OPERATOR_IP:8080/readyz" >/dev/null; do
  [ $SECONDS -lt $deadline ] || operator_failed "the operator's /readyz does not answer on $OPERATOR_IP:8080 after 60s"
  sleep 0.5
done
echo "/readyz answers on the pod's address: http://$OPERATOR_IP:8080/readyz (metrics on /metrics)"
echo "+ kubectl logs -n $NS $OPERATOR_POD | grep -E 'serving|started'"
k logs -n "$NS" "$OPERATOR_POD" | nocolor | grep -E 'serving|started' | cut -c1-160 | sed 's/^/  | /' || true

header "the namespace admits only 'restricted' pods: a pod mounting the datastore by hostPath is refused"
if out=$(k apply --dry-run=server -f - 2>&1 <<EOF
apiVersion: v1
kind: Pod
metadata: {name: datastore-by-hostpath, namespace: $NS}
spec:
  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: agent
    image: $AGENT_REF
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    volumeMounts: [{name: datastore, mountPath: /datastore, readOnly: true}]
  volumes: [{name: datastore, hostPath: {path: "$DS"}}]
EOF
); then
  echo "a pod with a hostPath volume was admitted: the namespace does not enforce 'restricted'" >&2; exit 1
fi
echo "$out" | fold -s -w 140 | sed 's/^/  /'

header "kubectl apply: credentials, SourceNode (datastore through a claim), repository volume and Repository"
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
      datastores: [{name: LocalDS_0, persistentVolumeClaim: {claimName: datastore, readOnly: true}}]
---
# The datastore as the ESXi hosts export it; here the simulator's directory on the node.
apiVersion: v1
kind: PersistentVolume
metadata: {name: $PV_DS}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: "$DS"}
  claimRef: {namespace: $NS, name: datastore}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: datastore, namespace: $NS}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: $PV_DS
  resources: {requests: {storage: 1Gi}}
---
# The repository: a local volume of the node; the kubelet gives it the pods' group (fsGroup),
# so the hub's unprivileged user writes the QCOW2 files.
apiVersion: v1
kind: PersistentVolume
metadata: {name: $PV}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  local: {path: "$REPO"}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: ["$NODE_NAME"]}]
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
EOF
k apply -f "$W/manifests/setup.yaml"
echo "(manifests in $W/manifests/setup.yaml)"
echo "waiting for the operator to log in to the vCenter and to probe the repository volume..."
if ! kw -n "$NS" --for=condition=Ready --timeout=120s sourcenode/vc repository/primary; then
  k describe -n "$NS" sourcenode/vc repository/primary >&2 || true
  k get events -n "$NS" --sort-by=.metadata.creationTimestamp >&2 || true
  echo "--- kubectl logs (operator, last 40 lines)" >&2; operator_tail 40 >&2; exit 1
fi
k get -n "$NS" sourcenode/vc repository/primary
k get pv "$PV_DS" "$PV"

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
  echo "--- kubectl logs (operator, last 40 lines)" >&2
  operator_tail 40 >&2 || true
  local pod
  for pod in $(k get pods -n "$NS" -l "sendense.io/backupjob=$1" -o name 2>/dev/null); do
    echo "--- kubectl logs $pod --all-containers (last 15 lines each)" >&2
    k logs -n "$NS" "$pod" --all-containers --prefix --tail=15 2>&1 | nocolor >&2 || true
  done
  echo "--- Events of the namespace (the last 40)" >&2
  k get events -n "$NS" --sort-by=.metadata.creationTimestamp 2>&1 | grep -v MissingClusterDNS | tail -n 40 >&2 || true
  exit 1
}

# While a job runs, a look into its pods (once each): they are containers of the agent image on
# the node, so `kubectl exec` and `kubectl logs` reach them through the kubelet.
HUB_SEEN=
AGENT_SEEN=
failed=
shown() { # what command...: runs the command, its output indented; a failure sets $failed
  local what=$1 out; shift
  echo "  + $what"
  out=$("$@" 2>&1) || failed=1
  [ -z "$out" ] || sed 's/^/    /' <<< "$out"
}
look_into_hub() { # job: once its first qemu-nbd container is ready; returns 1 until then
  local job=$1 hub=$1-hub ready port ip out pid1='tr "\0" " " < /proc/1/cmdline'
  failed=
  ready=$(k get pod -n "$NS" "$hub" -o jsonpath='{.status.containerStatuses[?(@.name=="nbd-2000")].ready}' 2>/dev/null || true)
  [ "$ready" = true ] || return 1
  port=$(k get -n "$NS" backupjob "$job" -o jsonpath='{.status.disks[?(@.deviceKey==2000)].port}')
  echo "  -- hub pod $hub is Running on $(k get pod -n "$NS" "$hub" -o jsonpath='{.spec.nodeName}'), its containers:"
  k get pod -n "$NS" "$hub" -o jsonpath='{range .status.containerStatuses[*]}{.name}{" "}{.containerID}{" "}{.image}{"\n"}{end}' \
    | awk '{printf "       %-9s %.26s... %s\n", $1, $2, $3}'
  # The hub serves on its pod IP, over TLS, to the job's agent alone (its client certificate):
  # an NBD client without one, even inside the hub's own pod, is turned away.
  ip=$(k get pod -n "$NS" "$hub" -o jsonpath='{.status.podIP}')
  echo "  + kubectl exec $hub -c nbd-2000 -- sendense-agent nbd-ping nbd://$ip:$port/   (no client certificate)"
  if out=$(k exec -n "$NS" "$hub" -c nbd-2000 -- sendense-agent nbd-ping "nbd://$ip:$port/" 2>&1); then
    sed 's/^/    /' <<< "$out"
    job_failed "$job" "its hub served an NBD client that has no certificate of the job"
  elif grep -q "requires TLS" <<< "$out"; then
    sed 's/^/    /' <<< "$out"
    echo "    (refused, as it must be: only the job's agent, with the job's TLS client certificate, is served)"
  else
    sed 's/^/    /' <<< "$out"
    failed=1
  fi
  shown "kubectl exec $hub -c nbd-2000 -- id" k exec -n "$NS" "$hub" -c nbd-2000 -- id
  shown "kubectl exec $hub -c nbd-2000 -- sh -c '$pid1'   (PID 1 of the container: its qemu-nbd)" \
    k exec -n "$NS" "$hub" -c nbd-2000 -- sh -c "$pid1"
  shown "kubectl logs $hub -c prepare   (the init container that made the QCOW2 files)" \
    k logs -n "$NS" "$hub" -c prepare
  if [ -n "$failed" ]; then
    # A failure is only the demo's bad timing when the backup ended (its hub removed) meanwhile.
    k get pod -n "$NS" "$hub" >/dev/null 2>&1 && job_failed "$job" "runs a hub that kubectl exec or logs cannot reach"
    echo "  (the backup finished, and its hub was removed, while the demo looked into it)"
  fi
  return 0
}
look_into_agent() { # job: once the agent has logged its snapshot; returns 1 until then
  local agent=$1-agent log
  log=$(k logs -n "$NS" "$agent" -c agent 2>/dev/null | nocolor || true)
  grep -q 'snapshot created' <<< "$log" || return 1
  echo "  -- agent pod $agent: $(k get pod -n "$NS" "$agent" -o jsonpath='{.status.containerStatuses[0].containerID}' 2>/dev/null | cut -c1-26)..."
  echo "  + kubectl logs $agent --tail=3"
  tail -n 3 <<< "$log" | cut -c1-200 | sed 's/^/    /'
  return 0
}

run_job() { # name mode [look]: applies a BackupJob and waits (bounded) for it to succeed;
  # with "look", looks into its hub and agent containers while they run
  local name=$1 mode=$2 look=${3:-} deadline=$((SECONDS + JOB_TIMEOUT)) line last="" phase restarts
  local start=$SECONDS
  HUB_SEEN=''
  AGENT_SEEN=''
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
      Succeeded)
        echo "  $name succeeded in $((SECONDS - start)) s"
        if [ -n "$look" ] && [ -z "$HUB_SEEN" ]; then
          echo "  (the backup ended before its hub's containers were seen Ready)"
        elif [ -n "$look" ] && [ -z "$AGENT_SEEN" ]; then
          echo "  (the backup ended before the agent's log could be read)"
        fi
        return 0 ;;
      Failed) job_failed "$name" "ended Failed" ;;
    esac
    if [ -n "$look" ]; then
      [ -n "$HUB_SEEN" ] || { look_into_hub "$name" && HUB_SEEN=1; } || true
      [ -n "$AGENT_SEEN" ] || { look_into_agent "$name" && AGENT_SEEN=1; } || true
    fi
    restarts=$(k get pod -n "$NS" "$OPERATOR_POD" -o jsonpath='{.status.containerStatuses[0].restartCount}' 2>/dev/null || true)
    [ "${restarts:-0}" = 0 ] || job_failed "$name" "was left unfinished: the operator exited (its container restarted $restarts time(s))"
    [ $SECONDS -lt "$deadline" ] || job_failed "$name" "did not succeed within ${JOB_TIMEOUT}s (phase: ${phase:-none})"
    sleep 0.5
  done
}

header "the guest writes its first data: 100 MiB at random places on disk 2000, 40 MiB on disk 2001"
guest fill -disk 2000 -pattern random -seed 1 -count 400 -size 256K
guest fill -disk 2001 -pattern sequential -seed 2 -count 40 -size 1M -offset 16M

header "BackupJob backup-1, mode full (looking into its hub and agent containers while it runs)"
run_job backup-1 full look
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

header "Events of backup-2's pods (gone now): scheduled onto $NODE_NAME, containers of the loaded image"
k get events -n "$NS" --field-selector involvedObject.kind=Pod -o json > "$W/pod-events.json"
python3 - "$W/pod-events.json" <<'PY'
import json, sys
pods = {}
for e in sorted(json.load(open(sys.argv[1]))["items"], key=lambda e: e.get("firstTimestamp") or ""):
    name, reason, msg = e["involvedObject"]["name"], e.get("reason", ""), e.get("message", "")
    if name not in ("backup-2-hub", "backup-2-agent"):
        continue
    p = pods.setdefault(name, {"node": "-", "images": set(), "Started": [], "Killing": [], "other": []})
    if reason == "Scheduled":
        p["node"] = msg.rsplit(" ", 1)[-1]
    elif reason == "Pulled":
        p["images"].add(msg)
    elif reason in ("Started", "Killing"):
        p[reason].append(msg.rsplit(" ", 1)[-1])
    elif reason not in ("Created", "MissingClusterDNS"):  # no DNS add-on: the host's resolv.conf
        p["other"].append(f"{reason}: {msg}")
for name, p in pods.items():
    print(f"  {name}: Scheduled to {p['node']}; started {', '.join(p['Started'])}; stopped {', '.join(p['Killing']) or '-'}")
    for m in sorted(p["images"]) + p["other"]:
        print(f"    {m}")
PY

header "restoring every restore point through its QCOW2 chain and comparing with the source"
deadline=$((SECONDS + 90))
while [ -n "$(k get pods -n "$NS" -l sendense.io/backupjob -o name 2>/dev/null)" ]; do
  if [ $SECONDS -ge $deadline ]; then
    echo "pods of the jobs still there after 90s:" >&2; k get pods -n "$NS" -l sendense.io/backupjob >&2; exit 1
  fi
  sleep 0.5
done
echo "  (the jobs' hub and agent pods are gone, so no qemu-nbd holds the files; read here with $AGENT)"
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
echo "  the RestorePoints the operator made from the manifests on the volume:"
k get -n "$NS" restorepoints -o wide | sed 's/^/    /'
echo "  files in the repository volume ($REPO, written by the hub's user 65532, group from fsGroup):"
(cd "$REPO" && find . -name '*.qcow2' -printf '%P\n' | sort | while IFS= read -r f; do
  backing=$(qemu-img info -U --output=json "$f" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename", ""))')
  printf '    %-60s %s %6s on disk%s\n' "$f" "$(stat -c %u:%g "$f")" "$(du -h "$f" | cut -f1)" "${backing:+, backed by $backing}"
done)
(cd "$REPO" && find . -name restorepoint.json -printf '%P\n' | sort | while IFS= read -r f; do
  printf '    %-60s manifest of job %s\n' "$f" "$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["job"]["name"], "uid", m["job"]["uid"], "attempt", m["attempt"])' "$f")"
done)
echo "  operator metrics (http://$OPERATOR_IP:8080/metrics):"
curl -sf --max-time 5 "http://$OPERATOR_IP:8080/metrics" | grep -E '^sendense_backups_total' | sed 's/^/    /' || true

header "restoring backup-2 with a RestoreJob (kubectl apply): both disks onto PersistentVolumeClaims"
RP=$(k get -n "$NS" backupjob backup-2 -o jsonpath='{.status.restorePoint}')
# The claims the RestoreJob creates (web-back-disk-2000, -2001) bind to these local volumes; on a
# cluster with a provisioner, spec.target.pvc.storageClassName names its class instead.
rm -rf "$W/restored"
for key in 2000 2001; do
  mkdir -p "$W/restored/$key"
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: $PV_R-$key}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  local: {path: "$W/restored/$key"}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: ["$NODE_NAME"]}]
  claimRef: {namespace: $NS, name: $RESTORE-disk-$key}
EOF
done
cat > "$W/manifests/restorejob.yaml" <<EOF
apiVersion: sendense.io/v1alpha1
kind: RestoreJob
metadata: {name: $RESTORE, namespace: $NS}
spec:
  restorePointRef: {name: $RP}
  target:
    pvc:
      storageClassName: ""
      kubeVirt: {memory: 1Gi, cpus: 1}
EOF
sed 's/^/    /' "$W/manifests/restorejob.yaml"
k apply -f "$W/manifests/restorejob.yaml"
if ! kw -n "$NS" --for=jsonpath='{.status.phase}'=Succeeded "restorejob/$RESTORE" --timeout=300s >/dev/null; then
  echo "the RestoreJob did not succeed:" >&2; k get -n "$NS" restorejob "$RESTORE" -o yaml >&2; exit 1
fi
k get -n "$NS" restorejob "$RESTORE" -o wide
k get -n "$NS" pvc "$RESTORE-disk-2000" "$RESTORE-disk-2001"
for pair in "2000 $I0" "2001 $I1"; do
  set -- $pair
  img=$W/restored/$1/disk.img
  got=$(sha256sum "$img" | cut -d' ' -f1)
  verified=$(k get -n "$NS" restorejob "$RESTORE" -o jsonpath="{.status.disks[?(@.deviceKey==$1)].verified}")
  if [ "$got" != "$2" ] || [ "$verified" != true ]; then
    echo "  disk $1: disk.img ($got, verified=$verified) DIFFERS from the disk at backup-2 ($2)" >&2; exit 1
  fi
  echo "  disk $1: disk.img on claim $RESTORE-disk-$1 is identical to the disk at backup-2 (sha256 ${2:0:16}...); $(du -h "$img" | cut -f1) allocated of $(du -h --apparent-size "$img" | cut -f1): holes stay holes"
done
echo "  the KubeVirt VirtualMachine it rendered (status.virtualMachine; apply it where KubeVirt runs):"
k get -n "$NS" restorejob "$RESTORE" -o jsonpath='{.status.virtualMachine}' | sed 's/^/    /'
k delete -n "$NS" restorejob "$RESTORE" --wait=true >/dev/null
k get -n "$NS" pvc "$RESTORE-disk-2000" -o name | sed 's/^/  the RestoreJob deleted, the restored disks stay: /'

DONE=1   # the exit trap uninstalls the release, then says how to go on
