{{/*
The chart name, "sendense" unless nameOverride says otherwise.
*/}}
{{- define "sendense.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: the release name when it contains the chart name (so
`helm install sendense` gives "sendense-operator", like config/), else "<release>-<chart>".
Kept short enough for the longest suffix ("-repository-editor") to fit 63 characters.
*/}}
{{- define "sendense.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "sendense.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object of the chart; each adds its app.kubernetes.io/component.
*/}}
{{- define "sendense.commonLabels" -}}
helm.sh/chart: {{ include "sendense.chart" . }}
app.kubernetes.io/name: {{ include "sendense.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sendense
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the operator's objects: Deployment, pod, ServiceAccount, Service, its RBAC.
*/}}
{{- define "sendense.labels" -}}
{{ include "sendense.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of the operator's Deployment selector, pods and metrics Service selector. The component
label keeps them apart from the hub and agent pods the operator creates (also named "sendense",
component hub or agent, without an instance label).
*/}}
{{- define "sendense.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sendense.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's Deployment, ClusterRole, Role and bindings.
*/}}
{{- define "sendense.operatorName" -}}
{{- printf "%s-operator" (include "sendense.fullname" .) }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "sendense.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sendense.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest} (Bitnami's convention):
global.imageRegistry, when set, replaces the image's registry; an empty registry leaves the
repository as the whole name; the digest wins over the tag; the tag defaults to the chart's
appVersion.
*/}}
{{- define "sendense.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- $registry := $image.registry | default "" }}
{{- with $root.Values.global }}
{{- with .imageRegistry }}
{{- $registry = . }}
{{- end }}
{{- end }}
{{- $name := $image.repository }}
{{- if $registry }}
{{- $name = printf "%s/%s" (trimSuffix "/" $registry) $image.repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $name $image.digest }}
{{- else }}
{{- printf "%s:%s" $name (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's rules on namespaced objects it needs in every namespace it watches: in a
ClusterRole for an all-namespaces install, in a Role of watchNamespace otherwise. Secrets and
ConfigMaps are not here (sendense.servedRules), nor Leases and the NBD CA
(sendense.ownNamespaceRules). Verified against operator/src/*.rs; keep in step with
config/rbac/role.yaml, and with the `kubectl auth can-i` table of operator/tests/chart.rs.
*/}}
{{- define "sendense.namespacedRules" -}}
# SourceNodes, Repositories, BackupJobs, RestoreJobs and BackupSchedules: the five controllers
# watch them (list + watch feed the caches) and read them by name when a job resolves its
# references (get). The operator never changes their spec.
- apiGroups: ["sendense.io"]
  resources: ["sourcenodes", "repositories", "backupjobs", "restorejobs", "backupschedules"]
  verbs: ["get", "list", "watch"]
# A running BackupJob carries the finalizer sendense.io/cleanup (a JSON patch of
# metadata.finalizers), so that deleting it mid-run stops its pods, removes its snapshot and
# partial files, and releases the VM, before it goes. A BackupSchedule creates its BackupJobs and
# deletes them past its history limits, or unstarted when its window closes.
- apiGroups: ["sendense.io"]
  resources: ["backupjobs"]
  verbs: ["create", "patch", "delete"]
# RestorePoints: created by the operator once a job's files are committed, or from a manifest a
# Repository probe lists (looked up by name, then server-side apply: get, create + patch); listed
# to choose a new backup's chain parent and counted per Repository. Not watched. Retention marks
# the one it prunes (patch) and deletes it, and its children's, once the volume no longer holds
# it as it was (the probe makes the children's again): the volume is the source of truth.
- apiGroups: ["sendense.io"]
  resources: ["restorepoints"]
  verbs: ["get", "list", "create", "patch", "delete"]
# Their status is the operator's output (Ready conditions, probe results, phase, per-disk
# progress), written by server-side apply of the status subresource (PATCH).
- apiGroups: ["sendense.io"]
  resources: ["sourcenodes/status", "repositories/status", "backupjobs/status", "restorejobs/status", "backupschedules/status"]
  verbs: ["patch"]
# Hub, agent, repository-probe, cleanup and restore pods. Created by server-side apply (PATCH, which also
# needs create when the pod does not exist yet), watched for readiness and termination messages
# (the agent's, probe's and commit's results), annotated (the hub's commit request), deleted when a
# job ends or an attempt is retried.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The repository probe pod's log: it lists the restore point manifests on the volume, one
# JSON line each (too many for a termination message), from which the operator makes the
# RestorePoints of a volume a lost namespace or cluster wrote. Read by name only.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# Each job's two NetworkPolicies (<job>-hub: its NBD ports from its agents only; <job>-agent:
# its progress port from the operator only), applied (create + patch) before its hub and
# owned by the job, so the garbage collector removes them with it.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# The claim a Repository's spec.storage.claimTemplate asks for: read by name (also an existing
# claim named by spec.storage.persistentVolumeClaim, to see it Bound) and created by server-side
# apply. Never deleted: backups must outlive the Repository object. Likewise the claims a
# RestoreJob restores disks onto (read by name to check their size, created when missing; never
# deleted: the restored disks outlive the job). No list/watch: the operator only reads claims by
# name.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
# The hub and agent pods' ServiceAccounts (serviceAccounts.hub/.agent): looked up by name and
# created by server-side apply when missing, with no token mounted and no bindings.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
# Events on SourceNodes, Repositories and BackupJobs, in their namespaces (kube-runtime's
# Recorder: create a new Event, patch its count when it repeats).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The operator's rules in each namespace it serves (where SourceNodes and their BackupJobs live):
in the ClusterRole "<operator>-secrets", bound by a RoleBinding in each namespace of
rbac.secretNamespaces (an all-namespaces install), or in the Role of watchNamespace.
*/}}
{{- define "sendense.servedRules" -}}
# Secrets, by name only (no list or watch: the operator cannot enumerate them):
# - get: the vCenter credentials Secret a SourceNode names, to log in to vCenter (the
#   SourceNode probe, a BackupJob's VM and disk lookup, the check that a failed job's snapshot
#   is gone); agent pods mount it as a volume, which the kubelet reads, not the operator;
# - create, patch, delete: each job's <job>-nbd-tls Secret, the certificates of its current
#   attempt, written by server-side apply before its hub and removed with its pods.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch", "delete"]
# The CA bundle ConfigMap a SourceNode may name for vCenter's TLS certificate, read by name,
# in the SourceNode's namespace like its credentials Secret.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- end }}

{{/*
The operator's rules on its own objects in the namespace of the VM Leases and the NBD CA: the
release namespace of an all-namespaces install (SENDENSE_LEASE_NAMESPACE), else watchNamespace.
*/}}
{{- define "sendense.ownNamespaceRules" -}}
# One Lease per VM being backed up (sendense-vm-<vCenter>-<VM instance UUID>), so one backup per
# VM runs at a time whatever the namespace or SourceNode: read, created by a job starting,
# taken over (update) from a job that ended, deleted when the holder ends. Only in this
# namespace; the names depend on the VM, so no resourceNames.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update", "delete"]
# The NBD CA (its certificate and key), read and replaced (update) when it nears its end or is
# unusable, and watched (list and watch with a metadata.name field selector) so each job's
# certificates are issued without reading it: this Secret only.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: ["sendense-nbd-ca"]
  verbs: ["get", "update", "list", "watch"]
# ... and created at first use: Kubernetes cannot limit create by name, so this allows creating
# any Secret in this namespace (not reading, changing or deleting one).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end }}

{{/*
The operator's rule on cluster-scoped objects: always in a ClusterRole.
*/}}
{{- define "sendense.clusterRules" -}}
# At startup the operator reads Sendense's own CRDs by name and exits with an install hint when
# one is missing. CRDs are cluster-scoped; resourceNames limits this to Sendense's six.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["sourcenodes.sendense.io", "repositories.sendense.io", "backupjobs.sendense.io", "restorepoints.sendense.io", "restorejobs.sendense.io", "backupschedules.sendense.io"]
  verbs: ["get"]
{{- end }}
