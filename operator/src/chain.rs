//! Chain choice: which restore point a new backup of a VM is layered on, and, per disk, a full
//! or an incremental copy with the reason a person reads in the job's status. Parents are
//! RestorePoints (what the repository holds), never BackupJobs: deleting or re-creating a job
//! changes nothing here.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sendense_crds::backup_job::{BackupMode, CopyKind};
use sendense_crds::{BackupJob, RestorePoint};

/// What one disk of a new backup will be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlan {
    Full {
        reason: String,
    },
    /// Layered on `parent_file` (the parent restore point's QCOW2 of this disk), changes since
    /// `change_id`.
    Incremental {
        parent: String,
        parent_file: String,
        change_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "spec.mode is incremental but repository {repository} holds no restore point of this VM: use mode auto or full"
    )]
    NoParent { repository: String },
    #[error(
        "spec.mode is incremental but disk {key} cannot be incremental: {reason}; use mode auto or full"
    )]
    DiskNeedsFull { key: i32, reason: String },
    #[error(
        "spec.mode is incremental but the chain of restore point {parent} already holds {length} restore points, the Repository's spec.maxChainLength: use mode auto or full, or raise maxChainLength"
    )]
    ChainFull { parent: String, length: usize },
}

/// The newest restore point of the VM (by its instance UUID, whatever its name then) in the
/// job's repository.
pub fn parent<'a>(
    job: &BackupJob,
    vm_instance_uuid: &str,
    candidates: &'a [RestorePoint],
) -> Option<&'a RestorePoint> {
    candidates
        .iter()
        .filter(|c| c.metadata.namespace == job.metadata.namespace)
        .filter(|c| c.spec.repository_ref.name == job.spec.repository_ref.name)
        .filter(|c| {
            !vm_instance_uuid.is_empty()
                && c.spec
                    .vm
                    .instance_uuid
                    .eq_ignore_ascii_case(vm_instance_uuid)
        })
        .max_by(|a, b| {
            a.spec
                .completed
                .0
                .cmp(&b.spec.completed.0)
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        })
}

/// The VM's restore points in the repository, newest first, walked from the newest down its
/// chain: the number of points in that chain and the time of its full.
pub fn chain_of(
    points: &[RestorePoint],
    repository: &str,
    instance_uuid: &str,
) -> (usize, Option<Timestamp>) {
    let mine: Vec<&RestorePoint> = points
        .iter()
        .filter(|p| {
            p.spec.repository_ref.name == repository
                && p.spec.vm.instance_uuid.eq_ignore_ascii_case(instance_uuid)
        })
        .collect();
    let Some(newest) = mine.iter().max_by_key(|p| p.spec.completed.0) else {
        return (0, None);
    };
    let by_name: BTreeMap<String, &RestorePoint> =
        mine.iter().map(|p| (p.name_any(), *p)).collect();
    let mut n = 0;
    let mut at = *newest;
    loop {
        n += 1;
        if at.spec.mode == CopyKind::Full || n > 100_000 {
            return (n, Some(at.spec.filed_at()));
        }
        match at.spec.parent.as_ref().and_then(|p| by_name.get(&p.name)) {
            Some(p) => at = p,
            // The chain's base is gone (pruned, or another repository): count what is here.
            None => return (n, None),
        }
    }
}

/// Full or incremental for each disk (`disks`: device key -> capacity in bytes now).
/// `length`: the restore points in the parent's chain (its full included); a chain already
/// `max_length` long is not extended (the Repository's `maxChainLength`).
pub fn plan(
    job: &BackupJob,
    parent: Option<&RestorePoint>,
    (length, max_length): (usize, usize),
    disks: &BTreeMap<i32, u64>,
) -> Result<BTreeMap<i32, DiskPlan>, ChainError> {
    let full = |reason: &str| DiskPlan::Full {
        reason: reason.to_owned(),
    };
    if job.spec.mode == BackupMode::Full {
        return Ok(disks
            .keys()
            .map(|k| (*k, full("spec.mode is full")))
            .collect());
    }
    let Some(parent) = parent else {
        if job.spec.mode == BackupMode::Incremental {
            return Err(ChainError::NoParent {
                repository: job.spec.repository_ref.name.clone(),
            });
        }
        return Ok(disks
            .keys()
            .map(|k| {
                (
                    *k,
                    full("no earlier restore point of this VM in this repository"),
                )
            })
            .collect());
    };
    let parent_name = parent.name_any();
    if length >= max_length {
        if job.spec.mode == BackupMode::Incremental {
            return Err(ChainError::ChainFull {
                parent: parent_name,
                length,
            });
        }
        let reason = format!(
            "the chain of restore point {parent_name} holds {length} restore points, the Repository's maxChainLength: a new chain starts"
        );
        return Ok(disks.keys().map(|k| (*k, full(&reason))).collect());
    }
    let mut out = BTreeMap::new();
    for (key, capacity) in disks {
        let plan = match parent.spec.disks.iter().find(|d| d.device_key == *key) {
            None => full(&format!("disk {key} is not in restore point {parent_name}")),
            Some(d) if d.capacity_bytes as u64 != *capacity => full(&format!(
                "disk {key} was resized from {} to {capacity} bytes since restore point {parent_name}",
                d.capacity_bytes
            )),
            Some(d) => DiskPlan::Incremental {
                parent: parent_name.clone(),
                parent_file: d.file.clone(),
                change_id: d.change_id_reached.clone(),
            },
        };
        if let (BackupMode::Incremental, DiskPlan::Full { reason }) = (job.spec.mode, &plan) {
            return Err(ChainError::DiskNeedsFull {
                key: *key,
                reason: reason.clone(),
            });
        }
        out.insert(*key, plan);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, TestObject};

    const WEB: &str = "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a";

    /// A job of namespace `ns` into repository `repo`.
    fn job(name: &str, mode: &str) -> BackupJob {
        BackupJob::test()
            .named(name)
            .in_namespace("ns")
            .with_spec(serde_json::json!({"vm": {"name": "web-01"}, "repositoryRef": {"name": "repo"}, "mode": mode}))
    }

    /// A restore point of VM `uuid` in repository `repo` of namespace `ns`.
    fn rp(name: &str, uuid: &str, repo: &str, at: &str, disks: serde_json::Value) -> RestorePoint {
        RestorePoint::test()
            .named(name)
            .in_namespace("ns")
            .with_spec(serde_json::json!({
                "vm": {"name": "whatever-it-was-called", "instanceUuid": uuid},
                "repositoryRef": {"name": repo}, "completed": at, "disks": disks
            }))
    }

    fn disk(key: i32, cap: u64, file: &str, change: &str) -> serde_json::Value {
        serde_json::json!({"deviceKey": key, "capacityBytes": cap, "file": file, "changeIdReached": change,
            "copy": "Full", "bytesWritten": 0, "sha256": ""})
    }

    #[test]
    fn the_newest_restore_point_of_the_same_vm_in_the_repository_is_the_parent() {
        let new = job("n", "auto");
        let none = serde_json::json!([]);
        let rps = vec![
            rp("old", WEB, "repo", "2026-11-20T00:00:00Z", none.clone()),
            rp(
                "newer",
                &WEB.to_uppercase(),
                "repo",
                "2026-11-21T00:00:00Z",
                none.clone(),
            ),
            rp(
                "other-repo",
                WEB,
                "elsewhere",
                "2026-11-22T00:00:00Z",
                none.clone(),
            ),
            rp(
                "other-vm",
                "4129a8f2-0000-4c2e-9a55-3f0b7e0d1c2a",
                "repo",
                "2026-11-22T00:00:00Z",
                none.clone(),
            ),
        ];
        assert_eq!(
            parent(&new, WEB, &rps).map(|p| p.name_any()).as_deref(),
            Some("newer")
        );
        assert!(parent(&new, "", &rps).is_none(), "no UUID, no chain");
        assert!(parent(&new, "0000", &rps).is_none());
    }

    #[test]
    fn auto_layers_each_disk_on_its_parent_file_or_says_why_not() {
        let p = rp(
            "p",
            WEB,
            "repo",
            "2026-11-21T00:00:00Z",
            serde_json::json!([
                disk(2000, 100, "ns/web-01/p-u-a1/2000.qcow2", "52 aa/7"),
                disk(2001, 50, "f", "c")
            ]),
        );
        let disks = BTreeMap::from([(2000, 100), (2001, 80), (2002, 10)]);
        let got = plan(&job("n", "auto"), Some(&p), (1, 32), &disks).expect("auto never fails");
        assert_eq!(
            got[&2000],
            DiskPlan::Incremental {
                parent: "p".into(),
                parent_file: "ns/web-01/p-u-a1/2000.qcow2".into(),
                change_id: "52 aa/7".into()
            }
        );
        assert!(
            matches!(&got[&2001], DiskPlan::Full { reason } if reason.contains("resized from 50 to 80"))
        );
        assert!(
            matches!(&got[&2002], DiskPlan::Full { reason } if reason.contains("is not in restore point p"))
        );
    }

    #[test]
    fn full_mode_ignores_the_parent_and_incremental_mode_refuses_to_fall_back() {
        let p = rp(
            "p",
            WEB,
            "repo",
            "2026-11-21T00:00:00Z",
            serde_json::json!([disk(2000, 100, "f", "c")]),
        );
        let disks = BTreeMap::from([(2000, 100), (2001, 10)]);
        let full = plan(&job("f", "full"), Some(&p), (1, 32), &disks).expect("full");
        assert!(
            full.values()
                .all(|d| matches!(d, DiskPlan::Full { reason } if reason == "spec.mode is full"))
        );
        let incr = job("i", "incremental");
        assert_eq!(
            plan(&incr, None, (0, 32), &disks).expect_err("no parent"),
            ChainError::NoParent {
                repository: "repo".into()
            }
        );
        let err = plan(&incr, Some(&p), (1, 32), &disks).expect_err("disk 2001 is new");
        assert!(
            matches!(err, ChainError::DiskNeedsFull { key: 2001, .. }),
            "{err}"
        );
        assert!(plan(&incr, Some(&p), (1, 32), &BTreeMap::from([(2000, 100)])).is_ok());
    }

    #[test]
    fn a_chain_at_its_longest_is_not_extended() {
        let p = rp(
            "p",
            WEB,
            "repo",
            "2026-11-21T00:00:00Z",
            serde_json::json!([disk(2000, 100, "f", "c")]),
        );
        let disks = BTreeMap::from([(2000, 100)]);
        let auto = plan(&job("n", "auto"), Some(&p), (4, 4), &disks).expect("auto");
        assert!(
            matches!(&auto[&2000], DiskPlan::Full { reason } if reason.contains("holds 4 restore points")),
            "{auto:?}"
        );
        assert!(matches!(
            plan(&job("n", "auto"), Some(&p), (3, 4), &disks).unwrap()[&2000],
            DiskPlan::Incremental { .. }
        ));
        let err = plan(&job("i", "incremental"), Some(&p), (4, 4), &disks).unwrap_err();
        assert!(err.to_string().contains("maxChainLength"), "{err}");
    }
}
