#!/usr/bin/env bash
# Static and server-side checks of the install artefacts (charts/sendense, config/), run by the
# test command against the local control plane (KUBECONFIG and KUBECTL set, as in
# e2e/run-tests.sh):
#   helm lint; the images' references (appVersion tag, global.imageRegistry, digests, pull
#   policies); helm template validated by kubeconform in strict mode against schemas generated
#   offline from the control plane's own OpenAPI (pinned Kubernetes version, our CRDs and the
#   prometheus-operator CRDs included); kubectl apply --dry-run=server of the chart and of
#   config/; a malformed value refused with its name; config/ applied twice diffs empty;
#   promtool check/test rules; every dashboard and alert query names a metric the operator
#   exports; chart and config/ copies of the rules and dashboard identical.
# `helm install` with the operator running under the chart's RBAC, a backup through it, and
# `promtool check metrics` on its live /metrics are in operator/tests/chart.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash e2e/tools/build.sh)"
: "${KUBECONFIG:?set KUBECONFIG (e2e/run-tests.sh does)}" "${KUBECTL:?set KUBECTL}"
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG" --request-timeout=60s "$@"; }
W=$(mktemp -d)
NS=sendense-chart-check
cleanup() {
  k delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  remove_config_default
  rm -rf "$W"
}
# Removes what config/default installed except the CRDs (deleting them would delete every
# Sendense object in the cluster, and the end-to-end tests that follow use them).
remove_config_default() {
  k delete -k config/rbac --ignore-not-found --wait=false >/dev/null 2>&1 || true
  k delete namespace sendense-system --ignore-not-found --timeout=90s >/dev/null 2>&1 || true
}
trap cleanup EXIT
ok() { echo "  ok: $*"; }

echo "helm lint"
"$HELM" lint --strict charts/sendense >/dev/null
"$HELM" lint --strict charts/sendense --set watchNamespace=team-a \
  --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true >/dev/null
ok "helm lint --strict (defaults, namespaced, monitoring on)"

echo "a malformed value fails at install, naming it"
if "$HELM" install sendense-bad-value charts/sendense --namespace "$NS" --dry-run=server --set metrics.port=abc >/dev/null 2>"$W/err"; then
  echo "helm accepted metrics.port=abc" >&2; exit 1
fi
grep -q 'metrics.port' "$W/err" || { echo "the error does not name metrics.port:" >&2; cat "$W/err" >&2; exit 1; }
ok "helm install refused it: $(grep -m1 'metrics.port' "$W/err" | sed 's/^[ -]*//' | cut -c1-120)"

echo "image references: the chart's appVersion, global.imageRegistry, digests, pull policies"
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/sendense/Chart.yaml)
# Prints "<operator image> <its pull policy> <agent image> <agent pull policy>" of a rendering.
images_of() {
  "$HELM" template sendense charts/sendense --namespace "$NS" "$@" | python3 -c '
import sys, yaml
for doc in yaml.safe_load_all(sys.stdin):
    if doc and doc.get("kind") == "Deployment":
        c = doc["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        print(c["image"], c["imagePullPolicy"], env["SENDENSE_AGENT_IMAGE"], env["SENDENSE_AGENT_IMAGE_PULL_POLICY"])'
}
expect_images() { # $1: what is expected, rest: helm arguments
  local want=$1 got; shift
  got=$(images_of "$@")
  [ "$got" = "$want" ] || { echo "helm template $*: images '$got', expected '$want'" >&2; exit 1; }
}
expect_images "ghcr.io/sendense/sendense-operator:$app_version IfNotPresent ghcr.io/sendense/sendense-agent:$app_version IfNotPresent"
expect_images "registry.example:5000/sendense/sendense-operator:$app_version IfNotPresent registry.example:5000/sendense/sendense-agent:$app_version IfNotPresent" \
  --set global.imageRegistry=registry.example:5000
expect_images "registry.example:5000/sendense/sendense-operator:$app_version IfNotPresent registry.example:5000/sendense/sendense-agent:$app_version IfNotPresent" \
  --set global.imageRegistry=registry.example:5000 --set image.registry=quay.io --set agentImage.registry=quay.io
digest=sha256:$(printf '%064d' 0)
expect_images "quay.io/team/operator:v9 Always mirror.local/sendense/sendense-agent@$digest Never" \
  --set image.registry= --set image.repository=quay.io/team/operator --set image.tag=v9 --set image.pullPolicy=Always \
  --set agentImage.registry=mirror.local --set agentImage.digest=$digest --set agentImage.pullPolicy=Never
if "$HELM" template sendense charts/sendense --set global.imageRegistry='Not A Registry' >/dev/null 2>"$W/err"; then
  echo "helm accepted global.imageRegistry='Not A Registry'" >&2; exit 1
fi
grep -q 'imageRegistry' "$W/err" || { echo "the error does not name global.imageRegistry:" >&2; cat "$W/err" >&2; exit 1; }
ok "ghcr.io/sendense/*:$app_version by default; global.imageRegistry moves both images; digests and pull policies pass through"

echo "kubeconform (strict) against the control plane's own schemas"
k apply --server-side --force-conflicts -k config/crd >/dev/null
for crd in servicemonitors prometheusrules; do
  k apply --server-side --force-conflicts -f "$PROMETHEUS_OPERATOR_CRDS/monitoring.coreos.com_$crd.yaml" >/dev/null
  k wait --for=condition=Established --timeout=60s "crd/$crd.monitoring.coreos.com" >/dev/null
done
k wait --for=condition=Established --timeout=60s crd/backupjobs.sendense.io crd/repositories.sendense.io crd/sourcenodes.sendense.io crd/restorepoints.sendense.io crd/restorejobs.sendense.io crd/backupschedules.sendense.io >/dev/null
k get --raw /openapi/v2 > "$W/openapi.json"
python3 e2e/tools/openapi-schemas.py "$W/openapi.json" "$W/schemas" 2>/dev/null
conform() { "$KUBECONFORM" -strict -summary -schema-location "$W/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" "$@"; }
render() { "$HELM" template sendense charts/sendense --namespace "$NS" --include-crds "$@"; }
render > "$W/default.yaml"
render --set watchNamespace=team-a > "$W/namespaced.yaml"
render --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true > "$W/monitoring.yaml"
for f in default namespaced monitoring; do conform "$W/$f.yaml" | sed 's/^/  /'; done
k kustomize config/default > "$W/config-default.yaml"
k kustomize config/prometheus > "$W/config-prometheus.yaml"
conform "$W/config-default.yaml" "$W/config-prometheus.yaml" | sed 's/^/  /'
conform config/samples/sendense_*.yaml | sed 's/^/  /'
# The schemas must catch a mistake, or the checks above prove nothing.
sed 's/^kind: Deployment$/kind: Deployment\nbogusTopLevelField: 1/' "$W/default.yaml" > "$W/bogus.yaml"
if conform "$W/bogus.yaml" >/dev/null 2>&1; then
  echo "kubeconform accepted an unknown field: the schemas are not strict" >&2; exit 1
fi
ok "an unknown field is rejected"

echo "kubectl apply --dry-run=server"
k get namespace "$NS" >/dev/null 2>&1 || k create namespace "$NS" >/dev/null
k get namespace team-a >/dev/null 2>&1 || k create namespace team-a >/dev/null
for f in default namespaced monitoring; do
  k apply --server-side --force-conflicts --dry-run=server -f "$W/$f.yaml" >/dev/null
done
k get namespace sendense-system >/dev/null 2>&1 || k create namespace sendense-system >/dev/null
k apply --server-side --dry-run=server -f "$W/config-default.yaml" -f "$W/config-prometheus.yaml" >/dev/null
ok "the chart (3 value sets), config/default and config/prometheus"

echo "GitOps: config/default applied twice changes nothing"
k apply --server-side -k config/default >/dev/null
k apply --server-side -k config/default >/dev/null
set +e; k diff --server-side -k config/default > "$W/diff" 2>&1; rc=$?; set -e
case $rc in
  0) ;;
  1) echo "kubectl diff is not empty after applying config/default twice:" >&2; cat "$W/diff" >&2; exit 1 ;;
  *) echo "kubectl diff failed:" >&2; cat "$W/diff" >&2; exit 1 ;;
esac
ok "kubectl diff -k config/default is empty"
remove_config_default

echo "Prometheus rules"
"$PROMTOOL" check rules charts/sendense/files/prometheus/sendense-rules.yaml | sed 's/^/  /'
(cd charts/sendense/files/prometheus && "$PROMTOOL" test rules sendense-rules.test.yaml) | sed 's/^/  /'

echo "chart and config/ ship the same rules and dashboard"
cmp charts/sendense/files/prometheus/sendense-rules.yaml config/prometheus/sendense-rules.yaml
cmp charts/sendense/files/grafana/sendense-dashboard.json config/prometheus/sendense-dashboard.json
python3 - <<'PY'
import yaml
a = yaml.safe_load(open("config/prometheus/sendense-rules.yaml"))["groups"]
b = yaml.safe_load(open("config/prometheus/prometheusrule.yaml"))["spec"]["groups"]
assert a == b, "config/prometheus/prometheusrule.yaml differs from sendense-rules.yaml"
PY
ok "identical (rules file, dashboard, and the PrometheusRule written out for kustomize)"

echo "every dashboard and alert query names a metric the operator exports"
python3 e2e/chart/check-queries.py operator/src/metrics.rs \
  charts/sendense/files/grafana/sendense-dashboard.json \
  charts/sendense/files/prometheus/sendense-rules.yaml
echo "chart checks passed"
