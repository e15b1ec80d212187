//! `SourceNode`: one VMware site Sendense backs up from.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, NFSVolumeSource, PersistentVolumeClaimVolumeSource, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN_RULE, KeyRef};

/// A VMware vCenter that Sendense backs up VMs from: how to reach it, how to read disks from it,
/// and where the agent pods that do the reading may run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "SourceNode",
    namespaced,
    status = "SourceNodeStatus",
    shortname = "srcnode",
    category = "sendense",
    doc = "A VMware vCenter that Sendense backs up VMs from.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "vCenter", type_ = "string", json_path = ".spec.vcenter.url"),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.vcenterVersion"
    ),
    printcolumn(
        name = "Transport",
        type_ = "string",
        json_path = ".spec.transport.type"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.transport.type != 'vddk' || has(self.vcenter.tls.thumbprint)")
    .message("transport.type vddk needs vcenter.tls.thumbprint: VDDK trusts vCenter only by its certificate's fingerprint (a CA bundle or insecureSkipVerify cannot be handed to it); set tls.thumbprint to the fingerprint `openssl x509 -noout -fingerprint` prints for the vCenter certificate")
    .field_path(".vcenter.tls"))]
pub struct SourceNodeSpec {
    /// How to reach and log in to the vCenter.
    pub vcenter: VCenter,
    /// Name of the vSphere datacenter whose VMs this node backs up.
    #[schemars(length(min = 1, max = 80))]
    pub datacenter: String,
    /// How disk contents are read from the site.
    pub transport: Transport,
    /// Where agent pods for this site are scheduled (near the site, with access to its network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Limits that protect the site from Sendense. Unset: at most 4 backups at once
    /// (`maxConcurrentJobs`' default), no datastore limit, no bandwidth cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SourceLimits>,
}

/// Connection to a vCenter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VCenter {
    /// The vCenter SDK endpoint, e.g. https://vcenter.example.com/sdk. Only https is accepted:
    /// credentials never travel in the clear.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() == 'https' && url(self).getHostname() != ''")
        .message("must be an https:// URL of the vCenter SDK endpoint, e.g. https://vcenter.example.com/sdk"))]
    pub url: String,
    /// Secret in this namespace holding the vCenter user name and password. The operator hands it
    /// to agent pods as environment from the Secret; it never appears in arguments, logs or status.
    pub credentials_secret_ref: CredentialsSecretRef,
    /// How the vCenter's TLS certificate is trusted.
    pub tls: VCenterTls,
}

/// A Secret holding vCenter credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the same namespace as the SourceNode.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,
    /// Key of the user name in the Secret.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// TLS trust for the vCenter: exactly one of a pinned fingerprint, a CA bundle, or an explicit
/// opt-out for labs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.thumbprint) ? 1 : 0) + (has(self.caConfigMapRef) ? 1 : 0) + (has(self.insecureSkipVerify) && self.insecureSkipVerify ? 1 : 0) == 1")
    .message("set exactly one of tls.thumbprint, tls.caConfigMapRef or tls.insecureSkipVerify: true"))]
pub struct VCenterTls {
    /// SHA-256 (or legacy SHA-1) fingerprint of the vCenter certificate, as colon-separated hex
    /// pairs (AA:BB:...), as shown by `openssl x509 -fingerprint -sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(
        "self.matches('^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$') || self.matches('^([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}$')")
        .message("must be a SHA-256 or SHA-1 fingerprint written as colon-separated hex pairs, e.g. AB:CD:...:EF"))]
    pub thumbprint: Option<String>,
    /// ConfigMap key holding the PEM CA bundle that signed the vCenter certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<KeyRef>,
    /// Skip certificate verification. For labs only: anyone on the path can read the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

/// How disk contents travel from the site to the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'nfs' ? has(self.nfs) : !has(self.nfs)")
    .message("transport.nfs lists the datastores to mount: it is required when transport.type is nfs and not allowed otherwise")
    .field_path(".nfs"))]
#[x_kube(validation = Rule::new("self.type == 'vddk' || !has(self.vddk)")
    .message("transport.vddk is only allowed when transport.type is vddk")
    .field_path(".vddk"))]
pub struct Transport {
    /// `vddk`: read through VMware's VDDK (nbdkit's vddk plugin). `nfs`: read the snapshot's flat
    /// disk files straight from the datastore, mounted into the agent pod.
    #[serde(rename = "type")]
    pub type_: TransportType,
    /// VDDK settings, for type vddk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vddk: Option<VddkTransport>,
    /// Datastore mounts, for type nfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsTransport>,
}

/// Transport kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransportType {
    Vddk,
    Nfs,
}

/// VDDK transport settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VddkTransport {
    /// VDDK transport modes to try, in order.
    #[serde(default = "default_vddk_modes")]
    #[schemars(length(min = 1, max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub modes: Vec<VddkMode>,
}

fn default_vddk_modes() -> Vec<VddkMode> {
    vec![VddkMode::Nbdssl]
}

/// VDDK transport modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VddkMode {
    Nbdssl,
    Nbd,
    Hotadd,
    San,
}

/// Datastores whose flat disk files the agent reads directly: each a claim or a volume the
/// administrator allows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NfsTransport {
    /// One entry per datastore whose disks are backed up, keyed by datastore name.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub datastores: Vec<DatastoreMount>,
    /// The user and groups the agent reads the datastores' files as. ESXi writes disk files
    /// readable by their owner only, so the agent must be that owner as the export presents
    /// it: the anonymous user of an export that squashes all clients (`anonuid`), or a group
    /// the files carry. Unset: the agent image's user, 65532. `user: 0` (an export with
    /// `no_root_squash`) runs the agent as root, which a namespace enforcing the `restricted`
    /// Pod Security Standard refuses; prefer an export squashing to a dedicated user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_as: Option<DatastoreReader>,
}

/// Who the agent is while it reads the datastores.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreReader {
    /// The agent's user ID (the pod's `runAsUser`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub user: Option<i64>,
    /// The agent's primary group ID (the pod's `runAsGroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub group: Option<i64>,
    /// Further groups the agent belongs to (the pod's `supplementalGroups`), for disk files
    /// readable by their group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(range(min = 0, max = 2147483647)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub supplemental_groups: Vec<i64>,
}

/// A datastore and the volume that holds its files: a claim in this namespace, or a volume the
/// Sendense administrator allows by name. A SourceNode cannot mount a node directory or an NFS
/// export itself: the operator creates agent pods with its own rights, so that would let anyone
/// who may edit SourceNodes mount them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.hostPath)")
    .message("hostPath is refused: a SourceNode may not mount a node's directory. Use persistentVolumeClaim (a claim in this namespace, bound to a PersistentVolume an administrator made) or volume (a datastore volume the Sendense administrator allows: the chart's datastoreVolumes)")
    .field_path(".hostPath"))]
#[x_kube(validation = Rule::new("!has(self.nfs)")
    .message("nfs is refused: a SourceNode may not mount an NFS export itself. Use persistentVolumeClaim (a claim bound to an NFS PersistentVolume an administrator made) or volume (a datastore volume the Sendense administrator allows: the chart's datastoreVolumes)")
    .field_path(".nfs"))]
#[x_kube(validation = Rule::new(
    "has(self.hostPath) || has(self.nfs) || (has(self.persistentVolumeClaim) != has(self.volume))")
    .message("set exactly one of persistentVolumeClaim or volume for each datastore"))]
pub struct DatastoreMount {
    /// The datastore's name in vSphere, as in `[name] vm/vm.vmdk`.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// A claim in this namespace whose volume holds the datastore (for production, a
    /// PersistentVolume of type NFS an administrator created, read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// The name of a datastore volume the Sendense administrator allows for this namespace
    /// (the chart's `datastoreVolumes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub volume: Option<String>,
    /// Refused: a raw NFS export (kept so that an older object is reported, not silently
    /// dropped). Use `persistentVolumeClaim` or `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// Refused: a node directory (kept so that an older object is reported, not silently
    /// dropped). Use `persistentVolumeClaim` or `volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
}

/// Where agent pods run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Nodes the agent pods may run on (matched against node labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the agent pods tolerate: only taints the Sendense administrator allows for this
    /// namespace (the chart's `agentPlacement.allowedTolerations`); otherwise the SourceNode
    /// is not Ready (reason NotAllowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// Concurrency and bandwidth limits towards one site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceLimits {
    /// Backups of this site that may run at once; more wait in Pending.
    #[serde(default = "default_max_concurrent_jobs")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrent_jobs: i32,
    /// Backups of this site that may read from one datastore at once (snapshots and NBD
    /// reads load the datastore); more wait in Pending. Unset means only
    /// `maxConcurrentJobs` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrent_jobs_per_datastore: Option<i32>,
    /// Bandwidth cap per agent pod (shared by all its disks), in megabits per second. Unset
    /// means no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 400000))]
    pub max_bandwidth_mbps: Option<i32>,
}

fn default_max_concurrent_jobs() -> i32 {
    DEFAULT_MAX_CONCURRENT_JOBS
}

/// Backups of one SourceNode that run at once when its spec sets no limit.
pub const DEFAULT_MAX_CONCURRENT_JOBS: i32 = 4;

/// What the operator last learnt by probing the vCenter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceNodeStatus {
    /// `Ready` is True when the last probe reached the vCenter and logged in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// vCenter product and version, as reported by the last successful probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcenter_version: Option<String>,
    /// When the vCenter was last probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
