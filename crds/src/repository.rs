//! `Repository`: the volume where backup chains live, and the hub that serves it over NBD.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::DNS_SUBDOMAIN_RULE;

/// Where backups are stored: a persistent volume holding one QCOW2 chain per VM disk, and the
/// port range its hub pods serve NBD on.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "Repository",
    namespaced,
    status = "RepositoryStatus",
    shortname = "repo",
    category = "sendense",
    doc = "A volume where Sendense keeps backup chains.",
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it is the value of the sendense.io/repository label on the repository's pods, claim and RestorePoints"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Restore Points",
        type_ = "integer",
        json_path = ".status.restorePoints"
    ),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.used"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// The volume backups are written to.
    pub storage: RepositoryStorage,
    /// How backup files are laid out on the volume.
    #[serde(default)]
    pub layout: Layout,
    /// The hub: pods that serve the repository's QCOW2 files over NBD to agents.
    #[serde(default)]
    pub hub: Hub,
    /// What is kept when a backup job does not say otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// The longest chain of restore points of a VM (its full included): a backup in mode
    /// `auto` that would make the chain longer is a full one (and starts a new chain), so a
    /// restore never reads through more layers than this. Mode `incremental` is refused past
    /// it. Retention's merges shorten chains too.
    #[serde(default = "default_max_chain_length")]
    #[schemars(range(min = 2, max = 1000))]
    pub max_chain_length: i32,
}

/// Chains of at most 32 restore points (a month of daily backups).
pub const DEFAULT_MAX_CHAIN_LENGTH: i32 = 32;

fn default_max_chain_length() -> i32 {
    DEFAULT_MAX_CHAIN_LENGTH
}

/// The repository volume: an existing claim, or a claim the operator creates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.persistentVolumeClaim) != has(self.claimTemplate)")
    .message("set exactly one of storage.persistentVolumeClaim (an existing claim) or storage.claimTemplate (a claim Sendense creates)"))]
pub struct RepositoryStorage {
    /// An existing PersistentVolumeClaim in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimRef>,
    /// A PersistentVolumeClaim the operator creates (named `<repository>-data`) and owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_template: Option<ClaimTemplate>,
}

/// An existing claim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    /// Name of the PersistentVolumeClaim, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub claim_name: String,
}

/// The claim to create.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimTemplate {
    /// Storage class of the claim; unset uses the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Requested size, as a Kubernetes quantity (e.g. 500Gi).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))")
        .message("must be a positive Kubernetes quantity, e.g. 500Gi or 2Ti"))]
    pub size: String,
    /// Access modes of the claim. ReadWriteMany lets hubs of several jobs run on different nodes.
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1, max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub access_modes: Vec<AccessMode>,
}

fn default_access_modes() -> Vec<AccessMode> {
    vec![AccessMode::ReadWriteOnce]
}

/// PersistentVolumeClaim access modes that can hold a repository (it must be writable).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
}

/// Layout of files on the repository volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// Directory of one VM's restore points, relative to the volume root. Placeholders:
    /// `{namespace}` and `{vm}` (the VM's name in vCenter); `{vm}` is required. Each restore
    /// point is a directory in it, `<backupjob>-<job UID>-a<attempt>`, holding one
    /// `<device key>.qcow2` per disk and its manifest, `restorepoint.json`.
    #[serde(default = "default_directory")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.contains('{vm}')")
        .message("must contain {vm}, so that every VM gets its own directory"))]
    #[x_kube(validation = Rule::new("!self.contains('{deviceKey}')")
        .message("must not contain {deviceKey}: the disks of one restore point share its directory (each file is named after its device key)"))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')")
        .message("must be a relative path inside the volume: no leading '/' and no '..'"))]
    pub directory: String,
}

fn default_directory() -> String {
    "{namespace}/{vm}".into()
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            directory: default_directory(),
        }
    }
}

/// Hub settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hub {
    /// Ports the hub's qemu-nbd servers are given, one per disk being backed up. The operator
    /// hands them out from live jobs, so a restart never leaks or double-books a port.
    #[serde(default)]
    pub port_range: PortRange,
}

/// An inclusive range of TCP ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.low < self.high")
    .message("portRange.low must be below portRange.high")
    .field_path(".low"))]
pub struct PortRange {
    /// First port of the range (inclusive).
    #[serde(default = "default_low_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub low: i32,
    /// Last port of the range (inclusive).
    #[serde(default = "default_high_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub high: i32,
}

fn default_low_port() -> i32 {
    10100
}
fn default_high_port() -> i32 {
    10200
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            low: default_low_port(),
            high: default_high_port(),
        }
    }
}

/// Retention of restore points, per VM: a point is kept when any rule keeps it; the others are
/// pruned (merged out of their chain, so every kept point still restores as it was). The
/// newest verified point of a VM is always kept. GFS rules keep the newest point of each of
/// the last N days (weeks, months, years) that have one, in `timeZone`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.keepLast) || has(self.keepDaily) || has(self.keepWeekly) || has(self.keepMonthly) || has(self.keepYearly)")
    .message("set at least one of keepLast, keepDaily, keepWeekly, keepMonthly, keepYearly (a retention that keeps nothing would prune every point but the newest)"))]
pub struct Retention {
    /// The newest N restore points of each VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_last: Option<i32>,
    /// The newest point of each of the last N days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_daily: Option<i32>,
    /// The newest point of each of the last N ISO weeks (Monday to Sunday) that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_weekly: Option<i32>,
    /// The newest point of each of the last N calendar months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep_monthly: Option<i32>,
    /// The newest point of each of the last N calendar years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_yearly: Option<i32>,
    /// The IANA time zone whose days, weeks, months and years the GFS rules count (`UTC`
    /// when unset), e.g. `Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Only report what would be pruned and why (in status), prune nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What the operator knows of the repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    /// `Ready` is True when the volume is bound and writable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Capacity of the volume in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    /// Bytes used on the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<i64>,
    /// Used space, human-readable (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
    /// Restore points held: the RestorePoints of this repository, all VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_points: Option<i32>,
    /// When the operator last proved the volume writable and measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Attempt directories (relative to the volume's root) of BackupJobs that no longer exist,
    /// holding no restore point and left unchanged for the operator's orphan idle time (one
    /// hour by default): the next probe, which follows at once, removes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphaned_attempts: Vec<String>,
    /// What the retention rules (the Repository's, or a BackupSchedule's for its VMs) keep and
    /// would prune, re-evaluated at every reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionStatus>,
}

/// The retention's verdict on the repository's restore points.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionStatus {
    /// Restore points some rule keeps.
    pub kept: i32,
    /// Restore points no rule keeps, oldest first, each with its VM and time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prune: Vec<PruneCandidate>,
    /// VMs whose rules could not be applied, and why (e.g. an unknown time zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The restore point being merged out of its chain now (one at a time per repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<String>,
    /// What the last prune did (or why it could not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prune: Option<String>,
    /// Restore points pruned since the Repository was created, and the bytes that freed.
    #[serde(default)]
    pub pruned: i64,
    #[serde(default)]
    pub bytes_freed: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PruneCandidate {
    pub restore_point: String,
    pub vm: String,
    pub time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Where the rules come from: `Repository` or `BackupSchedule <name>`.
    pub policy: String,
    /// The rules are `dryRun`: reported, not pruned.
    #[serde(default)]
    pub dry_run: bool,
    /// Why it goes: each rule and why it passes the point over (e.g. `keepDaily 3: day
    /// 2026-11-20 is not among the 3 newest with a point`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}
