//! Chain choice: which earlier backup a new backup of a VM is layered on, and, per disk, a full
//! or an incremental copy with the reason a person reads in the job's status.

use std::collections::BTreeMap;

use sendense_crds::BackupJob;
use sendense_crds::backup_job::{BackupMode, Phase};

/// What one disk of a new backup will be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlan {
    Full {
        reason: String,
    },
    /// Layered on `parent_file` (the parent job's QCOW2 of this disk), changes since `change_id`.
    Incremental {
        parent_job: String,
        parent_file: String,
        change_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "spec.mode is incremental but there is no successful earlier backup of this VM in repository {repository}: use mode auto or full"
    )]
    NoParent { repository: String },
    #[error(
        "spec.mode is incremental but disk {key} cannot be incremental: {reason}; use mode auto or full"
    )]
    DiskNeedsFull { key: i32, reason: String },
}

/// The same VM, as the spec names it: by instance UUID when both give one, else by name.
fn same_vm(a: &BackupJob, b: &BackupJob) -> bool {
    match (&a.spec.vm.instance_uuid, &b.spec.vm.instance_uuid) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
        (None, None) => a.spec.vm.name == b.spec.vm.name,
        // Named differently (one by UUID, one by name): not provably the same VM, so no chain.
        _ => false,
    }
}

/// The newest Succeeded backup of the same VM in the same repository and namespace.
pub fn parent<'a>(job: &BackupJob, candidates: &'a [BackupJob]) -> Option<&'a BackupJob> {
    candidates
        .iter()
        .filter(|c| c.metadata.name != job.metadata.name)
        .filter(|c| c.metadata.namespace == job.metadata.namespace)
        .filter(|c| c.spec.repository_ref.name == job.spec.repository_ref.name)
        .filter(|c| same_vm(c, job))
        .filter(|c| c.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded))
        .max_by(|a, b| {
            let t = |j: &BackupJob| {
                j.status
                    .as_ref()
                    .and_then(|s| s.completion_time.clone())
                    .map(|t| t.0)
            };
            t(a).cmp(&t(b))
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        })
}

/// Full or incremental for each disk (`disks`: device key -> capacity in bytes now).
pub fn plan(
    job: &BackupJob,
    parent: Option<&BackupJob>,
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
                    full("no earlier successful backup of this VM in this repository"),
                )
            })
            .collect());
    };
    let parent_name = parent.metadata.name.clone().unwrap_or_default();
    let parent_disks = parent
        .status
        .as_ref()
        .map(|s| s.disks.as_slice())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (key, capacity) in disks {
        let plan = match parent_disks.iter().find(|d| d.device_key == *key) {
            None => full(&format!("disk {key} was not in backup {parent_name}")),
            Some(d) if d.capacity_bytes.is_some_and(|c| c as u64 != *capacity) => full(&format!(
                "disk {key} was resized from {} to {capacity} bytes since backup {parent_name}",
                d.capacity_bytes.unwrap_or_default()
            )),
            Some(d) => match (&d.file, &d.change_id_reached) {
                (Some(file), Some(change_id)) => DiskPlan::Incremental {
                    parent_job: parent_name.clone(),
                    parent_file: file.clone(),
                    change_id: change_id.clone(),
                },
                _ => full(&format!(
                    "backup {parent_name} recorded no file or change ID for disk {key}"
                )),
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

    /// A job of namespace `ns` into repository `repo`.
    fn job(name: &str, vm: serde_json::Value, mode: &str, status: serde_json::Value) -> BackupJob {
        BackupJob::test()
            .named(name)
            .in_namespace("ns")
            .with_spec(
                serde_json::json!({"vm": vm, "repositoryRef": {"name": "repo"}, "mode": mode}),
            )
            .with_status(status)
    }

    fn done(at: &str, disks: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"phase": "Succeeded", "completionTime": at, "disks": disks})
    }

    fn disk(key: i32, cap: u64, file: &str, change: &str) -> serde_json::Value {
        serde_json::json!({"deviceKey": key, "capacityBytes": cap, "file": file, "changeIdReached": change})
    }

    #[test]
    fn the_newest_succeeded_backup_of_the_same_vm_is_the_parent() {
        let web = serde_json::json!({"name": "web-01"});
        let new = job("n", web.clone(), "auto", serde_json::json!({}));
        let jobs = vec![
            job(
                "old",
                web.clone(),
                "auto",
                done("2026-11-20T00:00:00Z", serde_json::json!([])),
            ),
            job(
                "newer",
                web.clone(),
                "auto",
                done("2026-11-21T00:00:00Z", serde_json::json!([])),
            ),
            job(
                "failed",
                web.clone(),
                "auto",
                serde_json::json!({"phase": "Failed", "completionTime": "2026-11-22T00:00:00Z"}),
            ),
            job(
                "other-vm",
                serde_json::json!({"name": "db-01"}),
                "auto",
                done("2026-11-22T00:00:00Z", serde_json::json!([])),
            ),
            job(
                "by-uuid",
                serde_json::json!({"instanceUuid": "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"}),
                "auto",
                done("2026-11-22T00:00:00Z", serde_json::json!([])),
            ),
        ];
        assert_eq!(
            parent(&new, &jobs)
                .and_then(|p| p.metadata.name.clone())
                .as_deref(),
            Some("newer")
        );
        let lonely = job(
            "x",
            serde_json::json!({"name": "app-07"}),
            "auto",
            serde_json::json!({}),
        );
        assert!(parent(&lonely, &jobs).is_none());
    }

    #[test]
    fn auto_layers_each_disk_on_its_parent_file_or_says_why_not() {
        let web = serde_json::json!({"name": "web-01"});
        let p = job(
            "p",
            web.clone(),
            "auto",
            done(
                "2026-11-21T00:00:00Z",
                serde_json::json!([
                    disk(2000, 100, "ns/web-01/2000/p.qcow2", "52 aa/7"),
                    disk(2001, 50, "f", "c")
                ]),
            ),
        );
        let new = job("n", web, "auto", serde_json::json!({}));
        let disks = BTreeMap::from([(2000, 100), (2001, 80), (2002, 10)]);
        let got = plan(&new, Some(&p), &disks).expect("auto never fails");
        assert_eq!(
            got[&2000],
            DiskPlan::Incremental {
                parent_job: "p".into(),
                parent_file: "ns/web-01/2000/p.qcow2".into(),
                change_id: "52 aa/7".into()
            }
        );
        assert!(
            matches!(&got[&2001], DiskPlan::Full { reason } if reason.contains("resized from 50 to 80"))
        );
        assert!(
            matches!(&got[&2002], DiskPlan::Full { reason } if reason.contains("was not in backup p"))
        );
    }

    #[test]
    fn full_mode_ignores_the_parent_and_incremental_mode_refuses_to_fall_back() {
        let web = serde_json::json!({"name": "web-01"});
        let p = job(
            "p",
            web.clone(),
            "auto",
            done(
                "2026-11-21T00:00:00Z",
                serde_json::json!([disk(2000, 100, "f", "c")]),
            ),
        );
        let disks = BTreeMap::from([(2000, 100), (2001, 10)]);
        let full = plan(
            &job("f", web.clone(), "full", serde_json::json!({})),
            Some(&p),
            &disks,
        )
        .expect("full");
        assert!(
            full.values()
                .all(|d| matches!(d, DiskPlan::Full { reason } if reason == "spec.mode is full"))
        );
        let incr = job("i", web.clone(), "incremental", serde_json::json!({}));
        assert_eq!(
            plan(&incr, None, &disks).expect_err("no parent"),
            ChainError::NoParent {
                repository: "repo".into()
            }
        );
        let err = plan(&incr, Some(&p), &disks).expect_err("disk 2001 is new");
        assert!(
            matches!(err, ChainError::DiskNeedsFull { key: 2001, .. }),
            "{err}"
        );
        assert!(plan(&incr, Some(&p), &BTreeMap::from([(2000, 100)])).is_ok());
    }
}
