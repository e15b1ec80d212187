//! The commit of a copied attempt, against a scripted API server: the agent's success
//! recorded, the hub asked to commit, its outcome (restore point, or the attempt failed), and
//! the copy older than the copied status that must not fail the attempt.

use super::api::{
    EVENTS, Handle, JOBS, cond, context_with_pods, expect, expect_job_version, expect_status_patch,
    not_found, reconciled,
};
use super::*;
use http::Response;
use kube::client::Body;
use serde_json::Value;

#[tokio::test]
async fn a_successful_agent_is_recorded_as_copied_then_the_agent_goes() {
    // It made progress a moment ago (an attempt idle for 10 minutes would fail instead).
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let j = job(
        json!({"phase": "Running", "attempts": 1, "lastProgressTime": now, "disks": [
        {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "f.qcow2", "copy": "Full"}
    ], "conditions": [{"type": "Running", "status": "True", "reason": "Copying", "message": "50%", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    );
    let hub = json!({"metadata": {"name": "web-01-b2-hub", "labels": {ATTEMPT_LABEL: "1"}},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}});
    let result = json!({"ok": true, "snapshot": {"id": "snapshot-1", "name": "sendense-web-01-b2", "removed": true},
        "disks": [{"key": 2000, "copy": "full", "reason": "first", "change_id_used": "*", "change_id_reached": "u/1", "bytes_to_copy": 4096, "bytes_written": 4096}]});
    let agent = json!({"metadata": {"name": "web-01-b2-agent", "labels": {ATTEMPT_LABEL: "1"}},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": "agent", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": result.to_string()}}}]}});
    // Both pods come from the cache: no read.
    let (ctx, mut h) = context_with_pods(vec![hub, agent]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    let patch = expect_status_patch(&mut h, &j).await;
    // Copied, to be committed: Running until the restore point exists.
    assert_eq!(patch["status"]["phase"], "Running");
    assert_eq!(patch["status"]["disks"][0]["changeIdReached"], "u/1");
    assert_eq!(cond(&patch, "Running")["reason"], "Committing");
    // One Event per changed condition: Running (Committing) and SnapshotRemoved.
    for reason in ["Committing", "Removed"] {
        let ev = expect(&mut h, "POST", EVENTS, 201, json!({})).await;
        assert_eq!(
            (&ev["type"], &ev["reason"]),
            (&json!("Normal"), &json!(reason))
        );
    }
    // The agent goes; the hub stays to commit, and the attempt's certificates with it.
    expect(
        &mut h,
        "DELETE",
        "/api/v1/namespaces/backups/pods/web-01-b2-agent",
        200,
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-agent"}}),
    )
    .await;
    reconciled(run).await;
}

/// The job once its agent succeeded: copied, to be committed (its copy ended at `completed`).
fn copied_job(completed: &str) -> BackupJob {
    let j = job(
        json!({"phase": "Running", "attempts": 1, "vmName": "web-01", "vmInstanceUuid": "5012-ab", "startTime": "2026-11-28T00:00:00Z", "disks": [
            {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "backups/web-01/b2-u-a1/2000.qcow2", "copy": "Full"}
        ]}),
    );
    let r = BackupResult::parse(
        r#"{"ok":true,"snapshot":{"id":"snapshot-1","name":"sendense-web-01-b2","removed":true},
        "disks":[{"key":2000,"copy":"full","reason":"first","change_id_used":"*","change_id_reached":"u/1","bytes_to_copy":4096,"bytes_written":4096}]}"#,
    )
    .expect("parses");
    let mut u = JobUpdate::new(&j);
    status::copied(&mut u, 1, &r);
    let mut st = serde_json::to_value(&u.status).expect("status");
    st["completionTime"] = json!(completed);
    job(st)
}

fn hub_pod(phase: &str, annotation: Option<&str>, message: Option<&str>) -> Value {
    let mut pod = json!({"metadata": {"name": "web-01-b2-hub", "uid": "hub-uid", "labels": {ATTEMPT_LABEL: "1"}},
        "status": {"phase": phase, "podIP": "10.0.0.5"}});
    if let Some(a) = annotation {
        pod["metadata"]["annotations"] = json!({"sendense.io/commit": a});
    }
    if let Some(m) = message {
        pod["status"]["containerStatuses"] = json!([{"name": "serve", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": if phase == "Succeeded" { 0 } else { 1 }, "message": m}}}]);
    }
    pod
}

const SOURCE_NODE: &str = "/apis/sendense.io/v1alpha1/namespaces/backups/sourcenodes/vc";
const HUB: &str = "/api/v1/namespaces/backups/pods/web-01-b2-hub";

#[tokio::test]
async fn a_copied_attempt_asks_its_hub_to_commit_the_manifest_once() {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let j = copied_job(&now);
    let (ctx, mut h) = context_with_pods(vec![hub_pod("Running", None, None)]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx.clone()));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    let patch = expect(&mut h, "PATCH", HUB, 200, hub_pod("Running", None, None)).await;
    // Only that pod (its UID the precondition), only the annotation.
    assert_eq!(patch["metadata"]["uid"], "hub-uid");
    let request = patch["metadata"]["annotations"]["sendense.io/commit"]
        .as_str()
        .expect("the request");
    let m = sendense_contract::manifest::Manifest::parse(request).expect("a manifest");
    assert_eq!(m.directory, "backups/web-01/b2-u-a1");
    assert_eq!(m.attempt, 1);
    assert_eq!(
        (
            m.disks[0].device_key,
            m.disks[0].file.as_str(),
            m.disks[0].sha256.as_str()
        ),
        (2000, "backups/web-01/b2-u-a1/2000.qcow2", "")
    );
    // No status write: Committing was written with the copy.
    reconciled(run).await;

    // Asked already: nothing is written again while the hub commits.
    let (ctx, mut h) = context_with_pods(vec![hub_pod("Running", Some(request), None)]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    reconciled(run).await;
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_millis(200), h.next_request()).await,
            Err(_) | Ok(None)
        ),
        "no request after the reconcile"
    );
}

#[tokio::test]
async fn a_hub_that_committed_makes_the_restore_point_and_the_job_succeeds() {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let j = copied_job(&now);
    let digest = "ab".repeat(32);
    let result = json!({"ok": true, "manifest": "backups/web-01/b2-u-a1/manifest.json",
        "disks": [{"deviceKey": 2000, "sha256": digest}]})
    .to_string();
    let (ctx, mut h) = context_with_pods(vec![hub_pod("Succeeded", Some("{}"), Some(&result))]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    let rps = "/apis/sendense.io/v1alpha1/namespaces/backups/restorepoints";
    let (req, send) = h.next_request().await.expect("a request");
    assert_eq!(req.method(), "GET");
    let rp_path = req.uri().path().to_owned();
    assert!(rp_path.starts_with(rps), "{rp_path}");
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&not_found()).expect("json")))
            .expect("response"),
    );
    // Created as the manifest says, the hub's digest in it (answered as sent).
    let (req, send) = h.next_request().await.expect("a request");
    assert_eq!(
        (req.method().as_str(), req.uri().path()),
        ("PATCH", rp_path.as_str())
    );
    let bytes = req.into_body().collect_bytes().await.expect("body");
    let rp: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(rp["spec"]["disks"][0]["sha256"], json!(digest));
    send.send_response(
        Response::builder()
            .status(201)
            .body(Body::from(bytes))
            .expect("response"),
    );
    let patch = expect_status_patch(&mut h, &j).await;
    assert_eq!(patch["status"]["phase"], "Succeeded");
    expect(&mut h, "POST", EVENTS, 201, json!({})).await;
    // Now the hub goes, and the attempt's certificates.
    expect(
        &mut h,
        "DELETE",
        HUB,
        200,
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-hub"}}),
    )
    .await;
    expect(
        &mut h,
        "DELETE",
        "/api/v1/namespaces/backups/secrets/web-01-b2-nbd-tls",
        200,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
    .await;
    reconciled(run).await;
}

/// Answers whatever comes (deletions of the attempt's pods and Secret) until the job's status
/// write, and returns that.
pub(super) async fn until_status_patch(h: &mut Handle, job: &BackupJob) -> Value {
    let status = format!("{JOBS}/{}/status", job.name_any());
    loop {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
            .await
            .expect("a request")
            .expect("the client is gone");
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let (code, body) = if path == status {
            (200, serde_json::to_value(job).expect("json"))
        } else {
            (404, not_found())
        };
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response"),
        );
        if path == status {
            return serde_json::from_slice(&bytes).expect("json");
        }
    }
}

#[tokio::test]
async fn a_failed_or_vanished_or_late_commit_fails_the_attempt_naming_why() {
    // (a) The hub failed to commit: its error is the attempt's.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let j = copied_job(&now);
    let result = json!({"ok": false, "error": "disk 2000 reads back short"}).to_string();
    let (ctx, mut h) = context_with_pods(vec![hub_pod("Failed", Some("{}"), Some(&result))]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    let patch = until_status_patch(&mut h, &j).await;
    let failed = patch.to_string();
    assert!(failed.contains("CommitFailed"), "{failed}");
    assert!(failed.contains("disk 2000 reads back short"), "{failed}");
    drop(h);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;

    // (b) The hub is gone (checked against the API server's job first).
    let mut j = j;
    j.metadata.resource_version = Some("7".into());
    let (ctx, mut h) = context_with_pods(vec![]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    expect(&mut h, "GET", HUB, 404, not_found()).await;
    expect_job_version(&mut h, "7").await;
    let patch = until_status_patch(&mut h, &j).await;
    let failed = patch.to_string();
    assert!(failed.contains("is gone before it committed"), "{failed}");
    drop(h);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;

    // (c) Asked, still running past the commit's deadline: progressDeadlineSeconds (600 by
    // default) plus 1 MiB read back at 8 MiB/s.
    let long_ago = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(601))
        .expect("time")
        .to_string();
    let j = copied_job(&long_ago);
    let request = crate::restore_point::manifest(&j, "")
        .expect("manifest")
        .to_json();
    let (ctx, mut h) = context_with_pods(vec![hub_pod("Running", Some(&request), None)]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(&mut h, "GET", SOURCE_NODE, 404, not_found()).await;
    let patch = until_status_patch(&mut h, &j).await;
    let failed = patch.to_string();
    assert!(failed.contains("did not commit"), "{failed}");
    assert!(failed.contains("within 600 s"), "{failed}");
    drop(h);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
}

/// The agent deleted after the copied status (its deletion's event can run the reconcile before
/// the job's watch brings that status): the older copy sees a recorded pod being deleted, but
/// the API server's job is newer, so the attempt is not failed as `PodLost`.
#[tokio::test]
async fn a_copy_older_than_the_copied_status_does_not_fail_the_attempt() {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut j = job(
        json!({"phase": "Running", "attempts": 1, "lastProgressTime": now,
        "pods": [{"name": "web-01-b2-hub", "uid": "hub-uid"}, {"name": "web-01-b2-agent", "uid": "agent-uid"}],
        "disks": [{"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "f.qcow2", "copy": "Full"}],
        "conditions": [{"type": "Running", "status": "True", "reason": "Copying", "message": "50%", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    );
    j.metadata.resource_version = Some("7".into());
    let hub = hub_pod("Running", None, None);
    let agent = json!({"metadata": {"name": "web-01-b2-agent", "uid": "agent-uid", "labels": {ATTEMPT_LABEL: "1"},
        "deletionTimestamp": now}, "status": {"phase": "Succeeded"}});
    let (ctx, mut h) = context_with_pods(vec![hub, agent]);
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect_job_version(&mut h, "8").await;
    assert_eq!(
        reconciled(run).await,
        Action::requeue(Duration::from_secs(1))
    );
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_millis(200), h.next_request()).await,
            Err(_) | Ok(None)
        ),
        "nothing written from the older copy"
    );
}
