//! `RestorePoint`: one committed backup of a VM, as its manifest on the repository volume
//! describes it. The volume is the source of truth: the operator creates these objects from the
//! manifests, never the other way round.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::backup_job::CopyKind;
use crate::common::LocalObjectRef;

/// A committed restore point of a VM: the QCOW2 files of every disk at one snapshot, flushed,
/// read back and described by `restorepoint.json` in their directory on the repository volume.
/// The operator creates one for each manifest it commits, and for each manifest the Repository's
/// probe finds on the volume (a namespace or cluster lost is not a backup lost); its spec never
/// changes. Deleting the object deletes no data, and the next probe lists it again; removing
/// data is retention's job.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "RestorePoint",
    namespaced,
    shortname = "rp",
    category = "sendense",
    doc = "A committed restore point of a VM, as its manifest on the repository volume describes it.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vm.name"),
    printcolumn(name = "Time", type_ = "date", json_path = ".spec.completed"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Parent", type_ = "string", json_path = ".spec.parent.name"),
    printcolumn(name = "Verified", type_ = "boolean", json_path = ".spec.verified"),
    printcolumn(
        name = "Repository",
        type_ = "string",
        json_path = ".spec.repositoryRef.name",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("a restore point never changes: it describes files already on the volume"))]
pub struct RestorePointSpec {
    /// The Repository whose volume holds it.
    pub repository_ref: LocalObjectRef,
    /// The SourceNode it was read through, and that SourceNode's vCenter URL.
    pub source_node_ref: LocalObjectRef,
    pub vcenter: String,
    pub vm: RestorePointVm,
    /// The BackupJob that made it. Its UID is the restore point's identity: a job's name can
    /// be reused, its UID cannot.
    pub job: RestorePointJob,
    /// `Full` when any disk was copied in full; `Incremental` when every disk holds only the
    /// changes since the parent.
    pub mode: CopyKind,
    /// The restore point the incremental disks are layered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<RestorePointParent>,
    /// When the job started, and when the copy completed (the data flushed): the restore
    /// point's time.
    pub started: Time,
    pub completed: Time,
    /// The scheduled time of the BackupSchedule run that made it, when a schedule did:
    /// retention files the point under this time (see [`RestorePointSpec::filed_at`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<Time>,
    /// The vSphere snapshot the disks were read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<RestorePointSnapshot>,
    /// Its directory on the volume, and its manifest there.
    pub directory: String,
    pub manifest: String,
    /// True when every disk's copied data was read back from the hub after the flush and
    /// found as the source gave it (`disks[].bytesVerified`). Each disk's `sha256` is its
    /// content read back through the chain at the commit.
    #[serde(default)]
    pub verified: bool,
    /// Data written into its files, in bytes and human-readable.
    pub bytes_written: i64,
    pub size: String,
    /// One entry per disk.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["deviceKey".into()]))]
    pub disks: Vec<RestorePointDisk>,
}

impl RestorePointSpec {
    /// The time retention and schedules file the point under: its schedule run's time when a
    /// BackupSchedule made it, else when its copy completed.
    pub fn filed_at(&self) -> k8s_openapi::jiff::Timestamp {
        self.scheduled.as_ref().unwrap_or(&self.completed).0
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointVm {
    /// The VM's name in vCenter at the time of the backup.
    pub name: String,
    /// vSphere's instance UUID of the VM: chains follow it, whatever the VM's name.
    pub instance_uuid: String,
    /// Its virtual hardware at the backup (absent in restore points made before Sendense
    /// recorded it): a restore to a new VM recreates it unless the RestoreJob says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<crate::common::VmHardware>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointJob {
    pub name: String,
    pub uid: String,
    /// The attempt whose files these are.
    pub attempt: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointParent {
    /// The parent RestorePoint's name, and its directory on the volume.
    pub name: String,
    pub directory: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointSnapshot {
    pub id: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointDisk {
    /// vSphere device key of the disk (2000, 2001, ...).
    pub device_key: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Its QCOW2 file, relative to the volume's root, and the parent's file it is layered on.
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    pub capacity_bytes: i64,
    pub copy: CopyKind,
    /// The CBT change ID the copy started from (incremental), and the one the data is complete
    /// up to: the next incremental of this disk starts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id_used: Option<String>,
    pub change_id_reached: String,
    pub bytes_written: i64,
    /// SHA-256 (hex) of the whole disk as this restore point restores it, read back through
    /// its chain when it was committed.
    pub sha256: String,
    /// Bytes read back from the hub after the flush and found as the source gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_verified: Option<i64>,
}

/// The name of the RestorePoint of a job: its name and the start of its UID, so that a job
/// name used again gives another restore point.
pub fn restore_point_name(job_name: &str, job_uid: &str) -> String {
    let short: String = job_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let max = 253 - short.len() - 1;
    let base = job_name.get(..max.min(job_name.len())).unwrap_or(job_name);
    format!("{}-{short}", base.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_point_names_carry_the_job_uid() {
        assert_eq!(
            restore_point_name("web-full", "8F14E45F-ceea-4c8a-9b1c-3a0b5e0d1c2a"),
            "web-full-8f14e45f"
        );
        let long = "a".repeat(253);
        let n = restore_point_name(&long, "0123456789");
        assert_eq!(n.len(), 253);
        assert!(n.ends_with("-01234567"));
    }
}
