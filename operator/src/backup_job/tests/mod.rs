//! The controller's tests: status transitions (pure), and the API calls of the main reconcile
//! paths against a scripted API server.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use sendense_contract::result::BackupResult;
use sendense_crds::BackupJob;
use sendense_crds::backup_job::{CopyKind, Phase};
use sendense_crds::conditions;
use serde_json::json;

use super::context::Context;
use super::reconcile;
use super::status::{self, JobUpdate};
use crate::fixtures::{Fixture, TestObject};
use crate::metrics::Metrics;
use crate::resources::{ATTEMPT_LABEL, PodSettings};

/// The test job (`web-01-b2` in `backups`) with this status.
fn job(status: serde_json::Value) -> BackupJob {
    BackupJob::test().with_status(status)
}

#[test]
fn targets_and_base_change_ids_come_from_status() {
    let j = job(json!({"phase": "Running", "disks": [
        {"deviceKey": 2000, "port": 10100, "copy": "Incremental", "changeIdUsed": "52 a/4"},
        {"deviceKey": 2001, "port": 10101, "copy": "Full", "changeIdUsed": "*"}
    ]}));
    let t = status::targets(&j, "10.1.2.3");
    assert_eq!(
        (t[0].key, t[0].url.as_str()),
        (
            2000,
            "nbds://10.1.2.3:10100/?tls-hostname=web-01-b2-hub.backups.svc"
        )
    );
    assert_eq!(
        (t[1].key, t[1].url.as_str()),
        (
            2001,
            "nbds://10.1.2.3:10101/?tls-hostname=web-01-b2-hub.backups.svc"
        )
    );
    let b = status::base_change_ids(&j);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].key, b[0].change_id.as_str()), (2000, "52 a/4"));
    let hub = status::hub_disks(&j);
    assert_eq!(hub[1].port, 10101);
}

#[test]
fn progress_reads_as_percent_and_sizes() {
    assert_eq!(status::progress_text(0, 0), "100% (0 B of 0 B)");
    assert_eq!(
        status::progress_text(512 << 20, 2 << 30),
        "25% (512.0 MiB of 2.0 GiB)"
    );
}

#[test]
fn a_successful_copy_is_recorded_then_committed_into_a_restore_point() {
    let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
        {"deviceKey": 2000, "port": 10100, "copy": "Incremental", "changeIdUsed": "u/3", "file": "a.qcow2"},
        {"deviceKey": 2001, "port": 10101, "copy": "Incremental", "changeIdUsed": "u/3", "file": "b.qcow2"}
    ]}));
    let r = BackupResult::parse(
        r#"{"ok":true,"snapshot":{"id":"snapshot-9","name":"sendense-web-01-b2","removed":true},
        "disks":[{"key":2000,"copy":"incremental","reason":"changes since u/3","change_id_used":"u/3","change_id_reached":"u/5","bytes_to_copy":1048576,"bytes_written":524288},
                 {"key":2001,"copy":"full","reason":"changeId u/3 is not valid any more","change_id_used":"*","change_id_reached":"v/1","bytes_to_copy":4096,"bytes_written":4096}]}"#,
    )
    .expect("parses");
    assert!(!status::is_copied(&j));
    let mut u = JobUpdate::new(&j);
    status::copied(&mut u, 1, &r);
    let st = u.status.clone();
    // Copied, not yet a restore point: still Running, committing.
    assert_eq!(st.phase, Some(Phase::Running));
    assert!(!conditions::is_true(&st.conditions, "Complete"));
    let running = conditions::find(&st.conditions, "Running").expect("Running");
    assert_eq!(running.reason, "Committing");
    assert!(status::is_copied(&job(
        serde_json::to_value(&st).expect("status")
    )));
    assert!(st.completion_time.is_some(), "the restore point's time");
    assert_eq!(st.disks[0].bytes_written, Some(524288));
    assert_eq!(st.disks[0].change_id_reached.as_deref(), Some("u/5"));
    assert_eq!(st.disks[1].copy, Some(CopyKind::Full));
    assert!(
        st.disks[1]
            .copy_reason
            .as_deref()
            .unwrap_or("")
            .contains("not valid")
    );
    assert_eq!(st.bytes_copied, Some(1048576 + 4096));
    assert_eq!(st.size.as_deref(), Some("516.0 KiB"));
    assert!(conditions::is_true(&st.conditions, "SnapshotRemoved"));
    assert_eq!(st.snapshot.as_ref().map(|s| s.removed), Some(true));

    let copied = job(serde_json::to_value(&st).expect("status"));
    let mut u = JobUpdate::new(&copied);
    status::committed(&mut u, "web-01-b2-8f14e45f");
    let st = u.status;
    assert_eq!(st.phase, Some(Phase::Succeeded));
    assert_eq!(st.restore_point.as_deref(), Some("web-01-b2-8f14e45f"));
    assert!(conditions::is_true(&st.conditions, "Complete"));
    // One attempt: nothing of another attempt to remove.
    assert!(conditions::find(&st.conditions, "PartialFilesRemoved").is_none());
}

#[test]
fn the_plans_reason_stays_unless_the_agent_departed_from_the_plan() {
    let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
        {"deviceKey": 2000, "copy": "Incremental", "copyReason": "changes since restore point rp-1", "changeIdUsed": "u/3"},
        {"deviceKey": 2001, "copy": "Full", "copyReason": "disk 2001 was resized from 16 to 24 bytes since restore point rp-1"},
        {"deviceKey": 2002, "copy": "Full", "copyReason": "disk 2002 is not in restore point rp-1"},
        {"deviceKey": 2003, "copy": "Incremental", "copyReason": "changes since restore point rp-1", "changeIdUsed": "w/2"}
    ]}));
    let r = BackupResult::parse(
        r#"{"ok":true,"disks":[
        {"key":2000,"copy":"incremental","reason":"changes since the previous backup","change_id_used":"u/3","change_id_reached":"u/5","bytes_to_copy":1,"bytes_written":1},
        {"key":2001,"copy":"full","reason":"no previous backup of this disk","change_id_used":"*","change_id_reached":"v/1","bytes_to_copy":1,"bytes_written":1},
        {"key":2002,"copy":"full","reason":"no previous backup of this disk","change_id_used":"*","change_id_reached":"x/1","bytes_to_copy":1,"bytes_written":1},
        {"key":2003,"copy":"full","reason":"full copy: vCenter no longer accepts change ID w/2","change_id_used":"*","change_id_reached":"y/1","bytes_to_copy":1,"bytes_written":1}]}"#,
    )
    .expect("parses");
    let mut u = JobUpdate::new(&j);
    status::copied(&mut u, 1, &r);
    let reasons: Vec<_> = u
        .status
        .disks
        .iter()
        .map(|d| (d.copy, d.copy_reason.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                Some(CopyKind::Incremental),
                "changes since restore point rp-1".to_owned()
            ),
            (
                Some(CopyKind::Full),
                "disk 2001 was resized from 16 to 24 bytes since restore point rp-1".to_owned()
            ),
            (
                Some(CopyKind::Full),
                "disk 2002 is not in restore point rp-1".to_owned()
            ),
            (
                Some(CopyKind::Full),
                "full copy: vCenter no longer accepts change ID w/2".to_owned()
            ),
        ]
    );
}

#[test]
fn a_retry_writes_into_its_own_directory_and_the_uncommitted_ones_are_removed() {
    let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
        {"deviceKey": 2000, "file": "ns/web/b2-u-a1/2000.qcow2", "backingFile": "ns/web/b1-v-a1/2000.qcow2", "changeIdReached": "x"},
        {"deviceKey": 2001, "file": "ns/web/b2-u-a1/2001.qcow2"}
    ]}));
    let mut u = JobUpdate::new(&j);
    let failure = super::outcome::Failure::new(super::outcome::FailureReason::HubFailed, "gone");
    status::retrying(&mut u, 1, 3, &failure);
    let st = u.status.clone();
    assert_eq!(st.attempts, Some(2));
    assert_eq!(
        st.disks[0].file.as_deref(),
        Some("ns/web/b2-u-a2/2000.qcow2")
    );
    assert_eq!(
        st.disks[1].file.as_deref(),
        Some("ns/web/b2-u-a2/2001.qcow2")
    );
    assert_eq!(
        st.disks[0].backing_file.as_deref(),
        Some("ns/web/b1-v-a1/2000.qcow2")
    );
    assert_eq!(
        st.disks[0].change_id_reached, None,
        "nothing of attempt 1 counts"
    );
    // Failed after two attempts: both directories go. Succeeded on the second: the first.
    let mut failed = st.clone();
    failed.phase = Some(Phase::Failed);
    let failed = job(serde_json::to_value(&failed).expect("status"));
    assert_eq!(
        status::uncommitted_dirs(&failed),
        ["ns/web/b2-u-a1", "ns/web/b2-u-a2"]
    );
    let mut succeeded = st;
    succeeded.phase = Some(Phase::Succeeded);
    let succeeded = job(serde_json::to_value(&succeeded).expect("status"));
    assert_eq!(status::uncommitted_dirs(&succeeded), ["ns/web/b2-u-a1"]);
}

#[test]
fn garbage_is_not_a_result() {
    assert!(BackupResult::parse("panicked at main.rs").is_none());
    assert!(BackupResult::parse("").is_none());
}

mod api;
mod commit;

#[test]
fn a_pod_of_the_attempt_lost_replaced_or_deleted_is_named() {
    use k8s_openapi::api::core::v1::Pod;
    let pod = |name: &str, uid: &str, deleting: bool| -> Option<Pod> {
        let mut meta = json!({"name": name, "uid": uid});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-11-25T10:00:00Z");
        }
        Some(serde_json::from_value(json!({"metadata": meta})).expect("pod"))
    };
    let j = job(json!({"phase": "Running", "attempts": 2, "pods": [
        {"name": "web-01-b2-hub", "uid": "h1"}, {"name": "web-01-b2-agent", "uid": "a1"}]}));
    let hub = pod("web-01-b2-hub", "h1", false);
    assert_eq!(
        status::lost_pod(&j, &[&hub, &pod("web-01-b2-agent", "a1", false)]),
        None
    );
    let gone = status::lost_pod(&j, &[&hub, &None]).expect("lost");
    assert!(
        gone.contains("web-01-b2-agent of attempt 2 disappeared"),
        "{gone}"
    );
    let other = status::lost_pod(&j, &[&hub, &pod("web-01-b2-agent", "a2", false)]).expect("lost");
    assert!(other.contains("replaced"), "{other}");
    let deleting = status::lost_pod(&j, &[&pod("web-01-b2-hub", "h1", true), &None]).expect("lost");
    assert!(
        deleting.contains("web-01-b2-hub of attempt 2 is being deleted"),
        "{deleting}"
    );
    // Nothing recorded (a pod not created yet): nothing lost.
    assert_eq!(
        status::lost_pod(&job(json!({"phase": "Running"})), &[&None, &None]),
        None
    );
    // A retry forgets the last attempt's pods.
    let mut u = JobUpdate::new(&j);
    let failure = super::outcome::Failure::new(super::outcome::FailureReason::PodLost, gone);
    status::retrying(&mut u, 2, 3, &failure);
    assert!(u.status.pods.is_empty());
}

#[path = "deadlines.rs"]
mod deadlines;
