//! Nothing waits forever: the job's deadline, the progress deadline of an attempt, and what a
//! failure calls for (retry, plan again, or fail now).

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use std::collections::BTreeMap;

use super::job;
use crate::backup_job::outcome::{Failure, FailureReason};
use crate::backup_job::plan::Plan;
use crate::backup_job::status::{self, JobUpdate};
use crate::fixtures::TestObject;
use sendense_contract::AgentReason;
use sendense_crds::BackupJob;
use sendense_crds::backup_job::DiskStatus;
use sendense_crds::conditions;

const T0: &str = "2026-11-26T10:00:00Z";

fn at(seconds_after_t0: i64) -> Timestamp {
    let t0: Timestamp = T0.parse().expect("time");
    t0 + SignedDuration::from_secs(seconds_after_t0)
}

/// A running job whose Running condition says `reason` since T0, with `lastProgressTime` T0.
fn running(reason: &str, spec: serde_json::Value) -> BackupJob {
    let mut j = job(json!({
        "phase": "Running", "attempts": 1, "startTime": T0, "lastProgressTime": T0,
        "conditions": [{"type": "Running", "status": "True", "reason": reason,
            "message": format!("attempt 1: {reason}"), "lastTransitionTime": T0}]
    }));
    let mut s = serde_json::to_value(&j.spec).expect("spec");
    if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
        s.extend(extra.clone());
    }
    j.spec = serde_json::from_value(s).expect("spec");
    j
}

#[test]
fn an_attempt_without_progress_fails_after_the_progress_deadline() {
    for reason in [
        "HubStarting",
        "AgentStarting",
        "Copying",
        "HubPodUnschedulable",
        "AgentPodRejected",
    ] {
        let j = running(reason, json!({"progressDeadlineSeconds": 120}));
        assert_eq!(status::overdue(&j, at(119)), None, "{reason}");
        let f = status::overdue(&j, at(120)).expect("overdue");
        assert_eq!(
            f.reason,
            FailureReason::ProgressDeadlineExceeded,
            "{reason}"
        );
        assert!(
            f.message.contains("spec.progressDeadlineSeconds: 120")
                && f.message.contains(&format!("attempt 1: {reason}")),
            "says the field and where it stood: {}",
            f.message
        );
    }
    // The default is ten minutes.
    let j = running("Copying", json!({}));
    assert_eq!(status::overdue(&j, at(599)), None);
    assert!(status::overdue(&j, at(600)).is_some());
    // A retry's back-off and a wait before the plan are not under it.
    for reason in ["Retrying", "VMBusy", "Committing"] {
        let j = running(reason, json!({"progressDeadlineSeconds": 20}));
        assert_eq!(status::overdue(&j, at(100_000)), None, "{reason}");
    }
}

#[test]
fn the_job_deadline_counts_from_the_first_attempt_and_is_not_retried() {
    let j = running("Copying", json!({"activeDeadlineSeconds": 3600}));
    let mut j2 = j.clone();
    // Progress up to date: only the job deadline can strike.
    j2.status.as_mut().expect("status").last_progress_time = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(3590)),
    );
    assert_eq!(status::overdue(&j2, at(3599)), None);
    let f = status::overdue(&j2, at(3600)).expect("past the deadline");
    assert_eq!(f.reason, FailureReason::DeadlineExceeded);
    assert!(f.message.contains("spec.activeDeadlineSeconds (3600 s)"));
    assert_eq!(
        f.reason.class(),
        crate::backup_job::outcome::FailureClass::Fatal
    );
    // Whatever ends an attempt past the deadline (the agent stopping itself), no retry follows.
    let stopped = Failure::new(
        FailureReason::Agent(Some(AgentReason::Stopped)),
        "deadline reached",
    );
    assert_eq!(
        status::past_deadline(&j, at(1000), stopped.clone()),
        stopped
    );
    let f = status::past_deadline(&j, at(3600), stopped);
    assert_eq!(f.reason, FailureReason::DeadlineExceeded);
    assert!(
        f.message.contains("Stopped: deadline reached"),
        "{}",
        f.message
    );
    // The agent pod gets what is left of it.
    assert_eq!(crate::resources::seconds_left(&j, at(600)), Some(3000));
    assert_eq!(crate::resources::seconds_left(&j, at(9000)), Some(1));
    assert_eq!(
        crate::resources::seconds_left(&BackupJob::test(), at(0)),
        None,
        "no deadline: none"
    );
}

#[test]
fn a_step_reached_bytes_copied_or_a_new_attempt_is_progress() {
    let j = running("HubStarting", json!({}));
    let old = j.status.as_ref().and_then(|s| s.last_progress_time.clone());
    // The same step, said again: no progress.
    let mut u = JobUpdate::new(&j);
    u.set(
        &crate::backup_job::outcome::Running::HubStarting,
        "attempt 1: still waiting",
    );
    status::mark_progress(&mut u);
    assert_eq!(u.status.last_progress_time, old);
    // The next step.
    let mut u = JobUpdate::new(&j);
    u.set(&crate::backup_job::outcome::Running::AgentStarting, "x");
    status::mark_progress(&mut u);
    assert_ne!(u.status.last_progress_time, old);
    // Bytes copied.
    let mut u = JobUpdate::new(&j);
    u.status.bytes_copied = Some(4096);
    status::mark_progress(&mut u);
    assert_ne!(u.status.last_progress_time, old);
}

#[test]
fn a_changed_vm_is_planned_again_and_keeps_its_attempt_count() {
    let j = job(
        json!({"phase": "Running", "attempts": 1, "startTime": T0, "chainParent": "b1-1234",
        "disks": [{"deviceKey": 2000, "port": 10100, "file": "ns/web/b2-u-a1/2000.qcow2",
                   "backingFile": "ns/web/b1-v-a1/2000.qcow2", "copy": "Incremental"}]}),
    );
    let failure = Failure::new(
        FailureReason::Agent(Some(AgentReason::DiskResized)),
        "disk 2000 grew from 1 GiB to 2 GiB",
    );
    let mut u = JobUpdate::new(&j);
    status::replanning(&mut u, 1, 4, &failure);
    assert_eq!(u.status.attempts, Some(2));
    assert!(u.status.disks.is_empty(), "planned again");
    let running = conditions::find(&u.status.conditions, "Running").expect("Running");
    assert_eq!(running.reason, "Retrying");
    assert!(running.message.contains("DiskResized") && running.message.contains("planning"));
    // The new plan keeps attempt 2, its directory and the first start time.
    let replanned = job(serde_json::to_value(&u.status).expect("status"));
    let mut u = JobUpdate::new(&replanned);
    status::started(
        &mut u,
        Plan {
            vm_name: "web".into(),
            vm_instance_uuid: "i".into(),
            vm_hardware: None,
            chain_parent: None,
            disks: vec![DiskStatus {
                device_key: 2000,
                port: Some(10100),
                file: Some("ns/web/b2-u-a1/2000.qcow2".into()),
                ..Default::default()
            }],
            ports: BTreeMap::from([(2000, 10100)]),
        },
    );
    assert_eq!(u.status.attempts, Some(2));
    assert_eq!(
        u.status.disks[0].file.as_deref(),
        Some("ns/web/b2-u-a2/2000.qcow2")
    );
    assert_eq!(
        u.status.start_time.as_ref().map(|t| t.0),
        Some(at(0)),
        "the job's deadline still counts from its first attempt"
    );
}
