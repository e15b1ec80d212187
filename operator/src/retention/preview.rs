//! The retention's verdict on a repository's restore points, for its status: per VM, the rules
//! of the BackupSchedule that backs it up (when that schedule sets `retention`) or else the
//! Repository's, applied by [`super::select`].

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use sendense_crds::repository::{PruneCandidate, Retention, RetentionStatus};
use sendense_crds::{BackupSchedule, Repository, RestorePoint};

use super::select::{Point, select};

/// The rules for each VM (instance UUID, lowercase) a schedule with its own retention backs up
/// into `repo`.
fn overrides<'a>(
    repo: &str,
    schedules: &'a [BackupSchedule],
) -> BTreeMap<String, (&'a Retention, String)> {
    let mut m = BTreeMap::new();
    for s in schedules {
        let Some(r) = s.spec.retention.as_ref() else {
            continue;
        };
        if s.spec.repository_ref.name != repo {
            continue;
        }
        for v in s.status.iter().flat_map(|st| st.vms.iter()) {
            m.entry(v.instance_uuid.to_ascii_lowercase())
                .or_insert((r, format!("BackupSchedule {}", s.name_any())));
        }
    }
    m
}

fn zone(r: &Retention) -> Result<TimeZone, String> {
    match r.time_zone.as_deref() {
        None | Some("UTC") => Ok(TimeZone::UTC),
        Some(z) => TimeZone::get(z)
            .map_err(|e| format!("retention.timeZone {z:?} is not an IANA time zone ({e})")),
    }
}

/// The verdict, or None when no rule applies to any VM of the repository.
pub fn preview(
    repo: &Repository,
    points: &[RestorePoint],
    schedules: &[BackupSchedule],
) -> Option<RetentionStatus> {
    let name = repo.name_any();
    let over = overrides(&name, schedules);
    let mut by_vm: BTreeMap<String, Vec<&RestorePoint>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.spec.repository_ref.name == name) {
        by_vm
            .entry(p.spec.vm.instance_uuid.to_ascii_lowercase())
            .or_default()
            .push(p);
    }
    let mut out = RetentionStatus::default();
    let mut any = false;
    for (uuid, mine) in by_vm {
        let (rules, policy) = match over.get(&uuid) {
            Some((r, p)) => (*r, p.clone()),
            None => match repo.spec.retention.as_ref() {
                Some(r) => (r, "Repository".to_owned()),
                None => {
                    out.kept += mine.len() as i32;
                    continue;
                }
            },
        };
        any = true;
        let vm = mine[0].spec.vm.name.clone();
        let tz = match zone(rules) {
            Ok(tz) => tz,
            Err(e) => {
                out.problems
                    .push(format!("VM {vm} ({policy}): {e}; nothing of it is pruned"));
                out.kept += mine.len() as i32;
                continue;
            }
        };
        let pts: Vec<Point> = mine
            .iter()
            .map(|p| Point {
                name: p.name_any(),
                time: p.spec.filed_at(),
                verified: p.spec.verified,
            })
            .collect();
        for v in select(&pts, rules, &tz).into_iter().rev() {
            if v.kept() {
                out.kept += 1;
            } else {
                out.prune.push(PruneCandidate {
                    restore_point: v.name,
                    vm: vm.clone(),
                    time: Some(Time(v.time)),
                    policy: policy.clone(),
                    dry_run: rules.dry_run,
                    reason: v.passed_over.join("; "),
                });
            }
        }
    }
    out.prune.sort_by_key(|c| c.time.as_ref().map(|t| t.0));
    any.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, TestObject};
    use serde_json::json;

    fn point(name: &str, uuid: &str, day: u32) -> RestorePoint {
        RestorePoint::test().named(name).with_spec(json!({
            "vm": {"name": format!("vm-{uuid}"), "instanceUuid": uuid},
            "completed": format!("2026-11-{day:02}T01:00:00Z"),
            "verified": true,
        }))
    }

    #[test]
    fn each_vm_gets_its_schedules_rules_or_the_repositorys() {
        let repo = Repository::test().with_spec(json!({
            "storage": {"persistentVolumeClaim": {"claimName": "backups-data"}},
            "retention": {"keepLast": 2}
        }));
        let points: Vec<RestorePoint> = (1..=4)
            .map(|d| point(&format!("a{d}"), "A", d))
            .chain((1..=4).map(|d| point(&format!("b{d}"), "b", d)))
            .collect();
        let schedule: BackupSchedule = serde_json::from_value(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "BackupSchedule",
            "metadata": {"name": "nightly", "namespace": "backups"},
            "spec": {"schedule": "0 1 * * *", "sourceNodeRef": {"name": "vc"},
                     "repositoryRef": {"name": "primary"}, "vms": {"namePattern": "*"},
                     "retention": {"keepLast": 1}},
            "status": {"vms": [{"instanceUuid": "b", "name": "vm-b"}]}
        }))
        .unwrap();
        let st = preview(&repo, &points, &[schedule]).expect("rules apply");
        let pruned: Vec<(&str, &str)> = st
            .prune
            .iter()
            .map(|c| (c.restore_point.as_str(), c.policy.as_str()))
            .collect();
        assert_eq!(
            pruned,
            [
                ("a1", "Repository"),
                ("b1", "BackupSchedule nightly"),
                ("a2", "Repository"),
                ("b2", "BackupSchedule nightly"),
                ("b3", "BackupSchedule nightly"),
            ]
        );
        assert_eq!(st.kept, 3);
        // No rules at all: no verdict.
        let bare = Repository::test();
        assert_eq!(preview(&bare, &points, &[]), None);
        // A bad time zone prunes nothing of that VM and says why.
        let bad = Repository::test().with_spec(json!({
            "storage": {"persistentVolumeClaim": {"claimName": "backups-data"}},
            "retention": {"keepDaily": 1, "timeZone": "Mars/Olympus"}
        }));
        let st = preview(&bad, &points, &[]).unwrap();
        assert!(st.prune.is_empty() && st.problems.len() == 2, "{st:?}");
    }
}
