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
        (2000, "nbd://10.1.2.3:10100/")
    );
    assert_eq!(
        (t[1].key, t[1].url.as_str()),
        (2001, "nbd://10.1.2.3:10101/")
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

/// The API calls of the main reconcile paths, against a scripted API server: each test
/// states the requests in order and what the server answers.
mod api {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::events::Reporter;
    use serde_json::Value;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<Context>, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let ctx = Context {
            client: client.clone(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            metrics: Metrics::new().expect("metrics"),
            images: PodSettings {
                agent: "agent:1".into(),
                ..Default::default()
            },
            vcenter_timeout: Duration::from_secs(5),
            allocation: tokio::sync::Mutex::new(()),
        };
        (Arc::new(ctx), handle)
    }

    /// Expects `method path` next, answers `status` with `body`; returns the request body.
    /// The job's status write; answers with the job as it was and returns the patch sent.
    async fn expect_status_patch(handle: &mut Handle, job: &BackupJob) -> Value {
        let path = format!("{JOBS}/{}/status", job.name_any());
        expect(
            handle,
            "PATCH",
            &path,
            200,
            serde_json::to_value(job).expect("json"),
        )
        .await
    }

    async fn expect(
        handle: &mut Handle,
        method: &str,
        path: &str,
        status: u16,
        body: Value,
    ) -> Value {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
            .expect("the client is gone");
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            (method, path),
            "unexpected request"
        );
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON request body")
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response"),
        );
        sent
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    const JOBS: &str = "/apis/sendense.io/v1alpha1/namespaces/backups/backupjobs";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/backups/events";

    fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
        status["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t))
            .unwrap_or_else(|| panic!("no {t} condition in {status}"))
    }

    #[tokio::test]
    async fn a_missing_source_node_makes_the_job_wait_with_a_reason_and_an_event() {
        let (ctx, mut h) = context();
        let j = job(json!({}));
        let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
        expect(
            &mut h,
            "GET",
            "/apis/sendense.io/v1alpha1/namespaces/backups/sourcenodes/vc",
            404,
            not_found(),
        )
        .await;
        let patch = expect_status_patch(&mut h, &j).await;
        assert_eq!(patch["status"]["phase"], "Pending");
        let c = cond(&patch, "Running");
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&json!("False"), &json!("SourceNodeNotFound"))
        );
        assert!(
            c["message"]
                .as_str()
                .unwrap_or("")
                .contains("spec.sourceNodeRef")
        );
        let ev = expect(&mut h, "POST", EVENTS, 201, json!({})).await;
        assert_eq!(
            (&ev["type"], &ev["reason"]),
            (&json!("Warning"), &json!("SourceNodeNotFound"))
        );
        let action = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the reconcile ends within 10 s (no request left unanswered)")
            .expect("joined")
            .expect("reconciled");
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn a_planned_job_without_pods_gets_its_hub_service_and_pod() {
        let (ctx, mut h) = context();
        let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
            {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "backups/web-01/2000/web-01-b2.qcow2", "copy": "Full"}
        ]}));
        let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
        expect(
            &mut h,
            "GET",
            "/api/v1/namespaces/backups/pods/web-01-b2-hub",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut h,
            "GET",
            "/api/v1/namespaces/backups/pods/web-01-b2-agent",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut h,
            "GET",
            "/apis/sendense.io/v1alpha1/namespaces/backups/repositories/primary",
            200,
            json!({"apiVersion": "sendense.io/v1alpha1", "kind": "Repository",
                   "metadata": {"name": "primary", "namespace": "backups"},
                   "spec": {"storage": {"persistentVolumeClaim": {"claimName": "vault"}}}}),
        )
        .await;
        let svc = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/backups/services/web-01-b2-hub",
            200,
            json!({"metadata": {"name": "web-01-b2-hub"}}),
        )
        .await;
        assert_eq!(svc["spec"]["ports"][0]["port"], 10100);
        let pod = expect(
            &mut h,
            "PATCH",
            "/api/v1/namespaces/backups/pods/web-01-b2-hub",
            200,
            json!({"metadata": {"name": "web-01-b2-hub", "uid": "hub-uid-1"}}),
        )
        .await;
        assert_eq!(pod["metadata"]["labels"][ATTEMPT_LABEL], "1");
        assert_eq!(
            pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "vault"
        );
        assert_eq!(pod["metadata"]["ownerReferences"][0]["name"], "web-01-b2");
        // The hub's UID is recorded: losing that pod fails the attempt.
        let patch = expect_status_patch(&mut h, &j).await;
        assert_eq!(
            patch["status"]["pods"],
            json!([{"name": "web-01-b2-hub", "uid": "hub-uid-1"}])
        );
        let action = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the reconcile ends within 10 s (no request left unanswered)")
            .expect("joined")
            .expect("reconciled");
        assert_eq!(action, Action::requeue(Duration::from_secs(3)));
    }

    #[tokio::test]
    async fn a_successful_agent_is_recorded_as_copied_then_the_pods_go() {
        let (ctx, mut h) = context();
        let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
            {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "f.qcow2", "copy": "Full"}
        ], "conditions": [{"type": "Running", "status": "True", "reason": "Copying", "message": "50%", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}));
        let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
        let hub = json!({"metadata": {"name": "web-01-b2-hub", "labels": {ATTEMPT_LABEL: "1"}},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}});
        let result = json!({"ok": true, "snapshot": {"id": "snapshot-1", "name": "sendense-web-01-b2", "removed": true},
            "disks": [{"key": 2000, "copy": "full", "reason": "first", "change_id_used": "*", "change_id_reached": "u/1", "bytes_to_copy": 4096, "bytes_written": 4096}]});
        let agent = json!({"metadata": {"name": "web-01-b2-agent", "labels": {ATTEMPT_LABEL: "1"}},
            "status": {"phase": "Succeeded", "containerStatuses": [{"name": "agent", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": result.to_string()}}}]}});
        expect(
            &mut h,
            "GET",
            "/api/v1/namespaces/backups/pods/web-01-b2-hub",
            200,
            hub,
        )
        .await;
        expect(
            &mut h,
            "GET",
            "/api/v1/namespaces/backups/pods/web-01-b2-agent",
            200,
            agent,
        )
        .await;
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
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-agent",
            200,
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-agent"}}),
        )
        .await;
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-hub",
            200,
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-hub"}}),
        )
        .await;
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-commit",
            404,
            not_found(),
        )
        .await;
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the reconcile ends within 10 s (no request left unanswered)")
            .expect("joined")
            .expect("reconciled");
    }

    #[tokio::test]
    async fn a_finished_job_only_makes_sure_its_pods_and_service_are_gone() {
        let (ctx, mut h) = context();
        let j = job(json!({"phase": "Succeeded", "disks": [{"deviceKey": 2000, "port": 10100}]}));
        let run = tokio::spawn(reconcile(Arc::new(j), ctx));
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-agent",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-hub",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/pods/web-01-b2-commit",
            404,
            not_found(),
        )
        .await;
        expect(
            &mut h,
            "DELETE",
            "/api/v1/namespaces/backups/services/web-01-b2-hub",
            404,
            not_found(),
        )
        .await;
        let action = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the reconcile ends within 10 s (no request left unanswered)")
            .expect("joined")
            .expect("reconciled");
        assert_eq!(action, Action::await_change());
    }
}

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
