//! `BackupJob`: one backup of one VM, full or incremental, from a SourceNode into a Repository.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::LocalObjectRef;

/// Longest BackupJob name: the name is carried as a label value (63 characters at most) and
/// prefixes the names of its hub and agent pods.
pub const MAX_NAME_LENGTH: usize = 52;

/// One backup of one VM: every selected disk read from a single vSphere snapshot and written as
/// the next link of that disk's QCOW2 chain. The spec cannot be changed once created.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "BackupJob",
    namespaced,
    status = "BackupJobStatus",
    shortname = "bj",
    category = "sendense",
    doc = "One backup of one VMware VM into a Sendense repository.",
    validation = Rule::new("size(self.metadata.name) <= 52")
        .message("metadata.name must be at most 52 characters: it names the job's pods and labels"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS label: lowercase letters, digits and '-', starting with a letter, no '.', e.g. web-01-nightly; it is one label of the name the job's hub certificate carries (<name>-hub.<namespace>.svc)"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(
        name = "Snapshot",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"SnapshotRemoved\")].reason"
    ),
    printcolumn(name = "VM", type_ = "string", priority = 1, json_path = ".status.vmName"),
    printcolumn(
        name = "Restore Point",
        type_ = "string",
        priority = 1,
        json_path = ".status.restorePoint"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("spec is immutable: create a new BackupJob instead of editing this one"))]
#[x_kube(validation = Rule::new("size(self.repositoryRef.name) <= 63")
    .message("repositoryRef.name must be at most 63 characters, as every Repository's name is (it is a label value)")
    .field_path(".repositoryRef.name"))]
pub struct BackupJobSpec {
    /// The VM to back up, by exactly one of name or instance UUID.
    pub vm: VmSelector,
    /// The SourceNode (vCenter) the VM lives in, in this namespace.
    pub source_node_ref: LocalObjectRef,
    /// The Repository the backup is written to, in this namespace.
    pub repository_ref: LocalObjectRef,
    /// `auto`: incremental when a usable previous backup of the VM exists in the repository,
    /// full otherwise. `full`: always copy every allocated block. `incremental`: fail rather
    /// than fall back to a full copy when no usable previous backup exists.
    #[serde(default)]
    pub mode: BackupMode,
    /// Device keys of the disks to back up (2000, 2001, ...). Unset backs up every disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(k, k >= 0)")
        .message("device keys are non-negative integers such as 2000"))]
    pub disks: Option<Vec<i32>>,
    /// Quiesce the guest file systems (VMware Tools) before the snapshot.
    #[serde(default)]
    pub quiesce: bool,
    /// Seconds the whole job may take, retries included; past it the job fails and its
    /// snapshot is removed. Unset means no deadline beyond the per-request network deadlines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2592000))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds an attempt may go without progress before it fails (and is retried): no byte
    /// copied and no step reached (hub Ready, agent started, snapshot taken, ...). It bounds a
    /// hub that never gets Ready, a pod that cannot be scheduled and a frozen agent. Raise it
    /// for a VM whose quiesced snapshot takes longer.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 20, max = 86400))]
    pub progress_deadline_seconds: i64,
    /// Read every copied chunk back from the hub after the flush and compare it with what the
    /// source gave; a difference fails the attempt (`VerificationFailed`). The RestorePoint
    /// records the outcome (`verified`). Costs one read of the changed data on the hub.
    #[serde(default = "default_verify")]
    pub verify: bool,
    /// Failed attempts retried before the job is marked Failed.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub retry_limit: i32,
}

fn default_retry_limit() -> i32 {
    3
}

fn default_verify() -> bool {
    true
}

/// Ten minutes without progress fails an attempt.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i64 = 600;

fn default_progress_deadline_seconds() -> i64 {
    DEFAULT_PROGRESS_DEADLINE_SECONDS
}

/// A VM, by exactly one of its names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.instanceUuid)")
    .message("set exactly one of vm.name or vm.instanceUuid"))]
pub struct VmSelector {
    /// The VM's inventory name in the SourceNode's datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 80))]
    pub name: Option<String>,
    /// The VM's instance UUID (config.instanceUuid), stable across renames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')")
        .message("must be a UUID such as 5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"))]
    #[schemars(length(min = 36, max = 36))]
    pub instance_uuid: Option<String>,
}

/// Full or incremental.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    #[default]
    Auto,
    Full,
    Incremental,
}

/// Where a backup job is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// What happened to a backup job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupJobStatus {
    /// Pending -> Running -> Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions: `Running` (its message carries progress in bytes and percent),
    /// `Succeeded`, `Failed`, `SnapshotRemoved`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The VM's inventory name, resolved from the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// The VM's instance UUID, resolved from the spec: which VM this is, whatever its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_instance_uuid: Option<String>,
    /// The VM's virtual hardware when the job looked it up (it goes into the restore point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_hardware: Option<crate::common::VmHardware>,
    /// The Lease (in the operator's namespace) that holds the VM for this job while it runs:
    /// one backup per VM at a time, whatever the namespace or SourceNode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_lease: Option<String>,
    /// The RestorePoint this job produced, once its files are committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_point: Option<String>,
    /// One entry per disk, keyed by device key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["deviceKey".into()]))]
    pub disks: Vec<DiskStatus>,
    /// The vSphere snapshot all disks were read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
    /// The RestorePoint this backup's incremental disks are layered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_parent: Option<String>,
    /// Attempts started so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// The pods the current attempt created (hub, agent), by UID. One that disappears, or is
    /// replaced by another of its name, fails the attempt: its files may be half-written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub pods: Vec<AttemptPod>,
    /// When the current attempt last made progress (a step reached, bytes copied):
    /// `spec.progressDeadlineSeconds` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the copy completed (the restore point's time), or the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes to copy over all disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_to_copy: Option<i64>,
    /// Bytes copied and flushed so far over all disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<i64>,
    /// Progress in percent, for `kubectl get` ("42%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Data this backup wrote to the repository (changed blocks read from the snapshot; zero
    /// runs and holes excluded), human-readable, for `kubectl get` ("1.5 GiB").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A pod of the current attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptPod {
    pub name: String,
    pub uid: String,
}

/// How one disk was backed up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// vSphere device key of the disk (2000, 2001, ...).
    pub device_key: i32,
    /// The disk's label in vSphere ("Hard disk 1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Capacity of the disk in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    /// Bytes the changed-block query said to copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_to_copy: Option<i64>,
    /// Bytes copied and flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<i64>,
    /// Hub port the disk's qemu-nbd served on during the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// The vSphere datastore holding the disk (for `limits.maxConcurrentJobsPerDatastore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// QCOW2 file of this backup's current attempt, relative to the repository volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// QCOW2 file it is layered on (incrementals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// CBT changeId the changes were queried from ("*" for a full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id_used: Option<String>,
    /// CBT changeId of the snapshot, recorded only once the data is flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id_reached: Option<String>,
    /// Bytes the agent read back from the hub after the flush and found as the source gave
    /// them; unset when the copy was not verified (`spec.verify: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_verified: Option<i64>,
    /// Bytes written into this disk's file (zero runs and holes excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<i64>,
    /// Whether this disk was copied in full or incrementally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyKind>,
    /// Why: "no previous backup", "changeId no longer valid: disk resized", ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_reason: Option<String>,
}

/// Full or incremental copy of one disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CopyKind {
    Full,
    Incremental,
}

/// The snapshot a job read from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Managed object id of the snapshot (snapshot-123).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Snapshot name; Sendense's own snapshots start with `sendense-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// True once the snapshot has been removed from the VM.
    #[serde(default)]
    pub removed: bool,
    /// Times the operator tried to remove it after the agent could not (the condition
    /// `SnapshotRemoved=False` while it keeps trying, with back-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_attempts: Option<i32>,
    /// When the operator last tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_removal_attempt: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
