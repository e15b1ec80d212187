//! `RestoreJob`: one restore of a RestorePoint — its disks onto PersistentVolumeClaims (raw
//! `disk.img` files KubeVirt boots from, or block devices), or files from its guest file systems
//! into a claim.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::backup_job::Phase;
use crate::common::{DNS_SUBDOMAIN_RULE, LocalObjectRef};

/// Longest RestoreJob name: it names the job's pods and is a label value.
pub const MAX_NAME_LENGTH: usize = 52;

/// One restore of a restore point. The restore point's files are read through their QCOW2
/// chain, read-only; nothing on the repository volume changes. The spec cannot be changed once
/// created.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "RestoreJob",
    namespaced,
    status = "RestoreJobStatus",
    shortname = "rj",
    category = "sendense",
    doc = "One restore of a Sendense restore point: disks onto PersistentVolumeClaims, or files from its guest file systems.",
    validation = Rule::new("size(self.metadata.name) <= 52")
        .message("metadata.name must be at most 52 characters: it names the job's pods and labels"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS label: lowercase letters, digits and '-', starting with a letter, no '.', e.g. web-01-restore; it names the claims Sendense creates (<name>-disk-<key>)"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Restore Point", type_ = "string", json_path = ".spec.restorePointRef.name"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetKind"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Written", type_ = "string", json_path = ".status.written"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("spec is immutable: create a new RestoreJob instead of editing this one"))]
pub struct RestoreJobSpec {
    /// The RestorePoint to restore, in this namespace (`kubectl get restorepoints`). Any point
    /// of a chain restores: its chain is read through its parents' files.
    pub restore_point_ref: LocalObjectRef,
    /// Device keys of the disks to restore (2000, 2001, ...). Unset restores every disk (for
    /// `target.files`: searches every disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(k, k >= 0)")
        .message("device keys are non-negative integers such as 2000"))]
    pub disks: Option<Vec<i32>>,
    /// Where the restore goes: exactly one of `pvc` or `files`.
    pub target: RestoreTarget,
    /// Seconds an attempt may wait for its pod to start (an unschedulable pod, a claim that
    /// never binds) before it fails and is retried.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 20, max = 86400))]
    pub progress_deadline_seconds: i64,
    /// Seconds one attempt's pod may run; past it the attempt fails (and is retried). Unset:
    /// no limit beyond the per-request network deadlines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2592000))]
    pub active_deadline_seconds: Option<i64>,
    /// Failed attempts retried before the job is marked Failed. Input that cannot work (a
    /// restore point that does not exist, a claim too small, a path matching nothing) fails
    /// at once, without retries.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub retry_limit: i32,
}

fn default_retry_limit() -> i32 {
    2
}

fn default_progress_deadline_seconds() -> i64 {
    600
}

/// Exactly one kind of target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.pvc), has(self.files), has(self.vsphere)].filter(x, x).size() == 1")
    .message("set exactly one of target.pvc, target.files or target.vsphere"))]
pub struct RestoreTarget {
    /// Each disk as a raw disk image on a claim: `disk.img` at the root of a Filesystem-mode
    /// claim (the layout KubeVirt's PVC disks use), or the device of a Block-mode claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcTarget>,
    /// Files from the restore point's guest file systems, into a claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesTarget>,
    /// The disks back into vSphere: a new VM, or the restore point's own VM in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsphere: Option<VsphereTarget>,
}

/// Disks into vSphere, written through the SourceNode's transport (`nfs`: the disks' flat
/// files on its datastores, which must be writable for restores; `vddk`: nbdkit's vddk plugin).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.newVm) != has(self.inPlace)")
    .message("set exactly one of target.vsphere.newVm or target.vsphere.inPlace"))]
pub struct VsphereTarget {
    /// The SourceNode (vCenter, datacenter, transport) to restore through; default the one
    /// the restore point was backed up through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node_ref: Option<LocalObjectRef>,
    /// A new VM with the restore point's disks (capacities, device-key order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_vm: Option<NewVmTarget>,
    /// The restore point's own VM (found by its instance UUID), its disks overwritten. The VM
    /// must be powered off and have no snapshots, or nothing is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_place: Option<InPlaceTarget>,
}

/// Where and how the new VM is made.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewVmTarget {
    /// The VM's name; no VM of that name may exist in the datacenter.
    #[schemars(length(min = 1, max = 80))]
    pub name: String,
    /// Datastore for the VM's files and disks (with the nfs transport, one of the SourceNode's
    /// datastores).
    #[schemars(length(min = 1, max = 255))]
    pub datastore: String,
    /// VM folder, an inventory path below the datacenter's VM folder (`restored`, `a/b`);
    /// default the datacenter's VM folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub folder: Option<String>,
    /// Resource pool: a cluster or host name (its root pool), or `Cluster/Resources/pool`;
    /// default the first cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub resource_pool: Option<String>,
    /// Virtual CPUs; default the source VM's at the backup (the restore point's
    /// `spec.vm.hardware`), else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 768))]
    pub cpus: Option<i32>,
    /// Memory in MiB; default the source VM's, else 2048.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 4, max = 25165824))]
    pub memory_mib: Option<i64>,
    /// vSphere guest OS identifier (`otherGuest64`, `ubuntu64Guest`, `windows2019srv_64Guest`);
    /// default the source VM's, else `otherGuest64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub guest_id: Option<String>,
    /// `bios` or `efi`; default the source VM's, else vSphere's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Efi,
}

/// The original VM, restored in place.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InPlaceTarget {
    /// Write only the blocks changed since the restore point (vCenter's CBT from the point's
    /// change ID, plus the blocks the later restore points of the chain hold) when CBT still
    /// vouches for them; the whole disk otherwise. `false`: always the whole disk.
    #[serde(default = "default_true")]
    pub differential: bool,
}

fn default_true() -> bool {
    true
}

/// Disks onto claims.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcTarget {
    /// The claim of each disk. A claim that exists is written (its `disk.img` replaced once the
    /// new one is complete; a Block-mode claim overwritten); one that does not is created, as
    /// are claims `<job>-disk-<key>` for the disks without an entry. Created claims are not
    /// owned by the job: deleting the RestoreJob keeps the restored disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["deviceKey".into()]))]
    pub claims: Vec<DiskClaim>,
    /// StorageClass of the claims Sendense creates; unset: the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Volume mode of the claims Sendense creates. `Block`: the disk is written onto the
    /// device itself, by a pod running as user and group 65532; the nodes' container runtime
    /// must give a block volume's device to the container's user (containerd's and CRI-O's
    /// `device_ownership_from_security_context = true`, which KubeVirt's CDI needs as well).
    #[serde(default)]
    pub volume_mode: VolumeMode,
    /// Access mode of the claims Sendense creates.
    #[serde(default)]
    pub access_mode: ClaimAccessMode,
    /// Also render a KubeVirt VirtualMachine that boots from the restored claims into
    /// `status.virtualMachine` (apply it with `kubectl apply -f`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_virt: Option<KubeVirt>,
}

/// The claim one disk is restored onto.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskClaim {
    /// vSphere device key of the disk (2000, 2001, ...).
    #[schemars(range(min = 0))]
    pub device_key: i32,
    /// The claim, in this namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub claim_name: String,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ClaimAccessMode {
    #[default]
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
}

/// A KubeVirt VirtualMachine rendered for the restored claims.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeVirt {
    /// The VirtualMachine's name; default the RestoreJob's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Memory of the VM (a quantity such as 2Gi); the restore point's `spec.vm.hardware` says
    /// what the source VM had.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    #[schemars(range(min = 1, max = 512))]
    pub cpus: i32,
}

fn default_memory() -> String {
    "2Gi".into()
}

fn default_cpus() -> i32 {
    1
}

/// Files from the guest file systems.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilesTarget {
    /// Paths to restore, absolute from a guest file system's root, as glob patterns: `*`, `?`,
    /// `[...]` within a name, `**` for any depth (`/etc/nginx/**`, `/home/*/.ssh`). A directory
    /// brings everything in it. Every pattern must match something, or nothing is written.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.all(p, p.startsWith('/'))")
        .message("paths are absolute, from the guest file system's root: start each with '/', e.g. /etc/hosts"))]
    pub paths: Vec<String>,
    /// Only this volume: `DISK:PARTITION` (`2000:1`; `2000:0` for a disk without a partition
    /// table). Unset: every volume with a file system Sendense reads (ext4, XFS, NTFS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+:[0-9]+$')")
        .message("a volume is DISK:PARTITION, e.g. 2000:1"))]
    pub volume: Option<String>,
    /// The claim the files are written to, in this namespace; it must exist.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub claim_name: String,
    /// Directory on the claim, relative to its root; default the RestoreJob's name. With
    /// `Tar`, the archive is `<directory>.tar`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')")
        .message("directory is relative to the claim's root and must not contain '..'"))]
    pub directory: Option<String>,
    /// `Directory`: files as files (owners kept only where the pod may set them); `Tar`: one
    /// archive keeping owners, modes and times with nanoseconds.
    #[serde(default)]
    pub format: FilesFormat,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum FilesFormat {
    #[default]
    Directory,
    Tar,
}

/// What happened to a restore job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreJobStatus {
    /// Pending -> Running -> Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Pvc` or `Files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kind: Option<String>,
    /// Standard conditions: `Running`, `Complete`, `Failed` (reasons a person can act on:
    /// `RestorePointNotFound`, `DiskNotFound`, `ClaimTooSmall`, `ClaimNotFound`,
    /// `NothingMatched`, `RestoreFailed`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Attempts started so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// When the current attempt's pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes to restore over all disks (their capacities), and bytes done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
    /// Progress in percent ("42%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Data written, in bytes and human-readable ("1.5 GiB"): holes and zeros are not
    /// written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<String>,
    /// The VM the restore point is of, and its Repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// One entry per restored disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["deviceKey".into()]))]
    pub disks: Vec<RestoredDiskStatus>,
    /// What a files restore wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<RestoredFilesStatus>,
    /// The vSphere VM restored into (`target.vsphere`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<RestoredVmStatus>,
    /// In place: the `coordination.k8s.io` Lease (in the operator's namespace) this job holds
    /// on the VM from its start to its end, so no backup of the VM runs meanwhile (and it
    /// waits, `VMBusy`, while a backup runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_lease: Option<String>,
    /// A KubeVirt VirtualMachine (YAML) booting from the restored claims, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine: Option<String>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The vSphere VM of a `vsphere` restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredVmStatus {
    pub name: String,
    /// Managed object ID (`vm-123`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub moref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_uuid: String,
    /// Created by this job (false: restored in place).
    #[serde(default)]
    pub created: bool,
    /// CBT was reset after an in-place restore: the VM's next backup is a full one.
    #[serde(default)]
    pub cbt_reset: bool,
}

/// One restored disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredDiskStatus {
    pub device_key: i32,
    /// The claim (`pvc` target).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub claim_name: String,
    /// `disk.img` on a Filesystem claim, or `Block` (`pvc` target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<VolumeMode>,
    /// The vSphere disk written, `[datastore] dir/name.vmdk` (`vsphere` target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// In place: only the blocks changed since the restore point were written; false: the
    /// whole disk, and `fullReason` says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Bytes read back after the flush and found as written (a differential restore's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_verified: Option<i64>,
    /// Created by this job (true) or found (false).
    #[serde(default)]
    pub created: bool,
    pub capacity_bytes: i64,
    /// Bytes sent as data, written as zeros, and skipped (holes and zeros on a new image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_zeroed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_skipped: Option<i64>,
    /// SHA-256 of the restored disk, read back from the claim after the flush; `verified`
    /// when it equals the restore point's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// What a files restore wrote.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredFilesStatus {
    /// Where, on the claim.
    pub path: String,
    pub files: i64,
    pub directories: i64,
    pub symlinks: i64,
    pub bytes: i64,
    /// Paths whose owner could not be set (the pod does not run as root; `Tar` keeps owners).
    #[serde(default)]
    pub ownership_not_set: i64,
    /// Paths that could not be restored, and the first 20 of them with why.
    #[serde(default)]
    pub failed: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}
