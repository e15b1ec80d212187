//! Restore points: the manifest a job's attempt is committed with (built from the job's status)
//! and the RestorePoint object made from a manifest. The object is always made from the
//! manifest, so one committed now and one found on a volume later look the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sendense_contract::manifest::{
    DiskCopy, JobIdentity, MANIFEST_VERSION, Manifest, ManifestDisk, ParentIdentity,
    SnapshotIdentity, VmHardware as ManifestHardware, VmIdentity,
};
use sendense_crds::backup_job::CopyKind;
use sendense_crds::common::{LocalObjectRef, VmHardware, human_bytes};
use sendense_crds::restore_point::{
    RestorePointDisk, RestorePointJob, RestorePointParent, RestorePointSnapshot, RestorePointVm,
    restore_point_name,
};
use sendense_crds::{BackupJob, RestorePoint, RestorePointSpec};

use crate::resources::{MANAGED_BY, dir_of};

/// Labels of a RestorePoint: its repository and VM, for selecting.
pub const REPOSITORY_LABEL: &str = "sendense.io/repository";
pub const VM_LABEL: &str = "sendense.io/vm-instance-uuid";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestBuildError {
    #[error("the job's status records no {0}")]
    Missing(&'static str),
}

fn rfc3339(t: &Option<Time>) -> String {
    t.as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now)
        .to_string()
}

/// The run time of a job a BackupSchedule made (its label and annotation).
fn scheduled_time(job: &BackupJob) -> Option<String> {
    use crate::schedule::plan::{SCHEDULE_LABEL, SCHEDULED_AT};
    job.labels().get(SCHEDULE_LABEL)?;
    let at: Timestamp = job.annotations().get(SCHEDULED_AT)?.parse().ok()?;
    Some(at.to_string())
}

/// The manifest of the job's current attempt, from its status (without digests: the commit
/// adds them). `vcenter`: the SourceNode's URL.
pub fn manifest(job: &BackupJob, vcenter: &str) -> Result<Manifest, ManifestBuildError> {
    let st = job.status.clone().unwrap_or_default();
    let file = st
        .disks
        .iter()
        .find_map(|d| d.file.clone())
        .ok_or(ManifestBuildError::Missing("disk file"))?;
    let directory = dir_of(&file).to_owned();
    let disks = st
        .disks
        .iter()
        .map(|d| {
            Ok(ManifestDisk {
                device_key: d.device_key,
                label: d.label.clone().unwrap_or_default(),
                file: d
                    .file
                    .clone()
                    .ok_or(ManifestBuildError::Missing("disk file"))?,
                backing_file: d.backing_file.clone(),
                capacity_bytes: d.capacity_bytes.unwrap_or_default().max(0) as u64,
                copy: match d.copy {
                    Some(CopyKind::Incremental) => DiskCopy::Incremental,
                    _ => DiskCopy::Full,
                },
                change_id_used: d.change_id_used.clone().filter(|c| c != "*"),
                change_id_reached: d
                    .change_id_reached
                    .clone()
                    .ok_or(ManifestBuildError::Missing("change ID reached"))?,
                bytes_written: d.bytes_written.unwrap_or_default().max(0) as u64,
                sha256: String::new(),
                bytes_verified: d.bytes_verified.map(|b| b.max(0) as u64),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parent = st.chain_parent.clone().and_then(|name| {
        let backing = st.disks.iter().find_map(|d| d.backing_file.clone())?;
        Some(ParentIdentity {
            name,
            directory: dir_of(&backing).to_owned(),
        })
    });
    Ok(Manifest {
        version: MANIFEST_VERSION,
        job: JobIdentity {
            namespace: job.namespace().unwrap_or_default(),
            name: job.name_any(),
            uid: job.uid().unwrap_or_default(),
        },
        attempt: st.attempts.unwrap_or(1),
        repository: job.spec.repository_ref.name.clone(),
        source_node: job.spec.source_node_ref.name.clone(),
        vcenter: vcenter.to_owned(),
        vm: VmIdentity {
            name: st.vm_name.clone().unwrap_or_default(),
            instance_uuid: st
                .vm_instance_uuid
                .clone()
                .ok_or(ManifestBuildError::Missing("VM instance UUID"))?,
            hardware: st.vm_hardware.as_ref().map(|h| ManifestHardware {
                cpus: h.cpus,
                memory_mib: h.memory_mib,
                guest_id: h.guest_id.clone(),
                firmware: h.firmware.clone(),
            }),
        },
        snapshot: st.snapshot.as_ref().and_then(|s| {
            Some(SnapshotIdentity {
                id: s.id.clone()?,
                name: s.name.clone().unwrap_or_default(),
            })
        }),
        parent,
        directory,
        started: rfc3339(&st.start_time),
        completed: rfc3339(&st.completion_time),
        scheduled: scheduled_time(job),
        disks,
        retention: None,
    })
}

fn time(text: &str) -> Time {
    Time(text.parse().unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The RestorePoint a committed manifest describes, in `namespace`.
pub fn from_manifest(m: &Manifest, namespace: &str) -> RestorePoint {
    let copy = |c: DiskCopy| match c {
        DiskCopy::Full => CopyKind::Full,
        DiskCopy::Incremental => CopyKind::Incremental,
    };
    let spec = RestorePointSpec {
        repository_ref: LocalObjectRef {
            name: m.repository.clone(),
        },
        source_node_ref: LocalObjectRef {
            name: m.source_node.clone(),
        },
        vcenter: m.vcenter.clone(),
        vm: RestorePointVm {
            name: m.vm.name.clone(),
            instance_uuid: m.vm.instance_uuid.clone(),
            hardware: m.vm.hardware.as_ref().map(|h| VmHardware {
                cpus: h.cpus,
                memory_mib: h.memory_mib,
                guest_id: h.guest_id.clone(),
                firmware: h.firmware.clone(),
            }),
        },
        job: RestorePointJob {
            name: m.job.name.clone(),
            uid: m.job.uid.clone(),
            attempt: m.attempt,
        },
        mode: copy(m.copy()),
        parent: m.parent.as_ref().map(|p| RestorePointParent {
            name: p.name.clone(),
            directory: p.directory.clone(),
        }),
        started: time(&m.started),
        completed: time(&m.completed),
        scheduled: m.scheduled.as_deref().map(time),
        snapshot: m.snapshot.as_ref().map(|s| RestorePointSnapshot {
            id: s.id.clone(),
            name: s.name.clone(),
        }),
        directory: m.directory.clone(),
        manifest: m.path(),
        verified: !m.disks.is_empty() && m.disks.iter().all(|d| d.bytes_verified.is_some()),
        bytes_written: m.bytes_written() as i64,
        size: human_bytes(m.bytes_written()),
        disks: m
            .disks
            .iter()
            .map(|d| RestorePointDisk {
                device_key: d.device_key,
                label: Some(d.label.clone()).filter(|l| !l.is_empty()),
                file: d.file.clone(),
                backing_file: d.backing_file.clone(),
                capacity_bytes: d.capacity_bytes as i64,
                copy: copy(d.copy),
                change_id_used: d.change_id_used.clone(),
                change_id_reached: d.change_id_reached.clone(),
                bytes_written: d.bytes_written as i64,
                sha256: d.sha256.clone(),
                bytes_verified: d.bytes_verified.map(|b| b as i64),
            })
            .collect(),
    };
    let mut rp = RestorePoint::new(&restore_point_name(&m.job.name, &m.job.uid), spec);
    rp.metadata = ObjectMeta {
        namespace: Some(namespace.to_owned()),
        labels: Some(
            [
                ("app.kubernetes.io/name", "sendense".to_owned()),
                ("app.kubernetes.io/managed-by", MANAGED_BY.to_owned()),
                (REPOSITORY_LABEL, m.repository.clone()),
                (VM_LABEL, m.vm.instance_uuid.to_ascii_lowercase()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ),
        ..rp.metadata
    };
    rp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, TestObject};

    fn copied_job() -> BackupJob {
        BackupJob::test().with_status(serde_json::json!({
            "phase": "Running", "attempts": 2, "vmName": "web-01",
            "vmInstanceUuid": "5029A8F2-1b6c-4c2e-9a55-3f0b7e0d1c2a",
            "startTime": "2026-11-25T10:00:00Z", "completionTime": "2026-11-25T10:05:00Z",
            "chainParent": "web-01-b1-0000000b",
            "snapshot": {"id": "snapshot-9", "name": "sendense-web-01-b2", "removed": true},
            "disks": [
                {"deviceKey": 2000, "label": "Hard disk 1", "capacityBytes": 1024, "copy": "Incremental",
                 "file": "backups/web-01/web-01-b2-u-2-a2/2000.qcow2",
                 "backingFile": "backups/web-01/web-01-b1-x-a1/2000.qcow2",
                 "changeIdUsed": "52 aa/1", "changeIdReached": "52 aa/2", "bytesWritten": 512},
                {"deviceKey": 2001, "capacityBytes": 2048, "copy": "Full",
                 "file": "backups/web-01/web-01-b2-u-2-a2/2001.qcow2",
                 "changeIdUsed": "*", "changeIdReached": "52 bb/1", "bytesWritten": 2048}
            ]
        }))
    }

    #[test]
    fn the_manifest_of_a_copied_job_describes_its_attempt_and_checks() {
        let m = manifest(&copied_job(), "https://vc/sdk").expect("manifest");
        m.check().expect("a valid manifest");
        assert_eq!(m.directory, "backups/web-01/web-01-b2-u-2-a2");
        assert_eq!((m.job.uid.as_str(), m.attempt), ("u-2", 2));
        assert_eq!(
            m.parent,
            Some(ParentIdentity {
                name: "web-01-b1-0000000b".into(),
                directory: "backups/web-01/web-01-b1-x-a1".into()
            })
        );
        assert_eq!(m.disks[1].change_id_used, None, "\"*\" is no change ID");
        assert_eq!(m.copy(), DiskCopy::Full);
        assert_eq!(m.completed, "2026-11-25T10:05:00Z");
        assert_eq!(m.scheduled, None, "not a schedule's job");
        // A schedule's job: the point is filed under the run's time.
        let mut scheduled = copied_job();
        scheduled.metadata.labels =
            Some([("sendense.io/schedule".to_owned(), "nightly".to_owned())].into());
        scheduled.metadata.annotations = Some(
            [(
                "sendense.io/scheduled-time".to_owned(),
                "2026-11-24T23:00:00Z".to_owned(),
            )]
            .into(),
        );
        let m2 = manifest(&scheduled, "https://vc/sdk").expect("manifest");
        assert_eq!(m2.scheduled.as_deref(), Some("2026-11-24T23:00:00Z"));
        let rp = from_manifest(&m2, "ns");
        assert_eq!(rp.spec.filed_at().to_string(), "2026-11-24T23:00:00Z");
        assert_eq!(rp.spec.completed.0.to_string(), "2026-11-25T10:05:00Z");

        let mut not_copied = copied_job();
        if let Some(st) = not_copied.status.as_mut() {
            st.disks[0].change_id_reached = None;
        }
        assert_eq!(
            manifest(&not_copied, "u"),
            Err(ManifestBuildError::Missing("change ID reached"))
        );
    }

    #[test]
    fn a_restore_point_is_its_manifest() {
        let m = manifest(&copied_job(), "https://vc/sdk").expect("manifest");
        let rp = from_manifest(&m, "backups");
        assert_eq!(
            rp.name_any(),
            "web-01-b2-2",
            "the name and the UID's first hex digits"
        );
        assert_eq!(rp.namespace().as_deref(), Some("backups"));
        assert_eq!(rp.spec.mode, CopyKind::Full);
        assert_eq!(rp.spec.bytes_written, 2560);
        assert_eq!(rp.spec.size, "2.5 KiB");
        assert_eq!(
            rp.spec.parent.as_ref().map(|p| p.name.as_str()),
            Some("web-01-b1-0000000b")
        );
        assert_eq!(rp.spec.completed.0.to_string(), "2026-11-25T10:05:00Z");
        assert_eq!(
            rp.labels().get(VM_LABEL).map(String::as_str),
            Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a")
        );
        assert!(
            rp.owner_references().is_empty(),
            "deleting the job keeps it"
        );
    }
}
