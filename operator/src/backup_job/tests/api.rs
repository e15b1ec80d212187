//! The API calls of the main reconcile paths, against a scripted API server: each test
//! states the requests in order and what the server answers.

use super::*;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::Value;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    context_with_pods(Vec::new())
}

/// The context with these pods in the controller's pod cache.
fn context_with_pods(pods: Vec<Value>) -> (Arc<Context>, Handle) {
    let pods = pods
        .into_iter()
        .map(|mut p| {
            p["apiVersion"] = json!("v1");
            p["kind"] = json!("Pod");
            p["metadata"]["namespace"] = json!("backups");
            serde_json::from_value(p).expect("a pod")
        })
        .collect();
    context_with(crate::backup_job::Caches::with_pods(pods))
}

fn context_with(caches: crate::backup_job::Caches) -> (Arc<Context>, Handle) {
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
        lease_namespace: "sendense-system".into(),
        nbd_ca_secret: "sendense-nbd-ca".into(),
        allocation: tokio::sync::Mutex::new(()),
        caches,
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

async fn expect(handle: &mut Handle, method: &str, path: &str, status: u16, body: Value) -> Value {
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

/// The spawned reconcile's outcome; it must end within 10 s (no request left unanswered).
async fn reconciled(
    run: tokio::task::JoinHandle<Result<Action, crate::backup_job::Error>>,
) -> Action {
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the reconcile ends within 10 s (no request left unanswered)")
        .expect("joined")
        .expect("reconciled")
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
    let action = reconciled(run).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// A SourceNode or Repository the controller's cache holds Ready is not read again; one it
/// holds not Ready is: a job waits only on the API server's word.
#[tokio::test]
async fn a_cached_ready_source_node_is_not_read_and_a_cached_unready_repository_is() {
    use crate::fixtures::{Fixture, TestObject};
    use sendense_crds::{Repository, SourceNode};
    let ready = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Connected",
        "message": "", "lastTransitionTime": "2026-11-28T00:00:00Z"}]});
    let sn = SourceNode::test().with_status(ready);
    let repo = Repository::test().with_status(json!({"conditions": [{"type": "Ready",
        "status": "False", "reason": "ClaimNotBound", "message": "",
        "lastTransitionTime": "2026-11-28T00:00:00Z"}]}));
    let (ctx, mut h) = context_with(crate::backup_job::Caches::with_objects(
        Vec::new(),
        vec![sn],
        vec![repo],
    ));
    let j = job(json!({}));
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(
        &mut h,
        "GET",
        "/apis/sendense.io/v1alpha1/namespaces/backups/repositories/primary",
        404,
        not_found(),
    )
    .await;
    let patch = expect_status_patch(&mut h, &j).await;
    let c = cond(&patch, "Running");
    assert_eq!(c["reason"], "RepositoryNotFound");
    expect(&mut h, "POST", EVENTS, 201, json!({})).await;
    reconciled(run).await;
}

/// A new job whose SourceNode's slots the caches show taken (its SourceNode and Repository
/// Ready there) is queued without a request but its status write: no vCenter login, no list of
/// the jobs or restore points; queued, it waits without any.
#[tokio::test]
async fn a_new_job_finding_its_source_nodes_slots_taken_is_queued_from_the_caches() {
    use crate::fixtures::{Fixture, TestObject};
    use sendense_crds::{Repository, SourceNode};
    let ready = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Connected",
        "message": "", "lastTransitionTime": "2026-11-28T00:00:00Z"}]});
    let sn = SourceNode::test()
        .edit(|v| v["spec"]["limits"] = json!({"maxConcurrentJobs": 1}))
        .with_status(ready.clone());
    let repo = Repository::test().with_status(ready);
    let running = BackupJob::test()
        .named("web-02-b1")
        .with_status(json!({"phase": "Running"}));
    let j = job(json!({}));
    let caches = || {
        crate::backup_job::Caches::with_jobs(
            Vec::new(),
            vec![sn.clone()],
            vec![repo.clone()],
            vec![running.clone()],
        )
    };
    let (ctx, mut h) = context_with(caches());
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    let patch = expect_status_patch(&mut h, &j).await;
    let c = cond(&patch, "Running");
    assert_eq!(c["reason"], "SourceNodeLimit");
    expect(&mut h, "POST", EVENTS, 201, json!({})).await;
    let action = reconciled(run).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // Queued: its next look asks nothing.
    let queued = job(patch["status"].clone());
    let (ctx, mut h) = context_with(caches());
    let run = tokio::spawn(reconcile(Arc::new(queued), ctx));
    reconciled(run).await;
    assert!(matches!(
        tokio::time::timeout(Duration::from_millis(200), h.next_request()).await,
        Err(_) | Ok(None)
    ));

    // Its Repository not Ready in the cache: the job goes the whole way, and says why.
    let (ctx, mut h) = context_with(crate::backup_job::Caches::with_jobs(
        Vec::new(),
        vec![sn.clone()],
        vec![Repository::test()],
        vec![running.clone()],
    ));
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect(
        &mut h,
        "GET",
        "/apis/sendense.io/v1alpha1/namespaces/backups/repositories/primary",
        404,
        not_found(),
    )
    .await;
    let patch = expect_status_patch(&mut h, &j).await;
    assert_eq!(cond(&patch, "Running")["reason"], "RepositoryNotFound");
    expect(&mut h, "POST", EVENTS, 201, json!({})).await;
    reconciled(run).await;
}

/// A planned job of one disk, at version 7, without pods yet.
fn planned_job() -> BackupJob {
    let mut j = job(json!({"phase": "Running", "attempts": 1, "disks": [
        {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "backups/web-01/2000/web-01-b2.qcow2", "copy": "Full"}
    ]}));
    j.metadata.resource_version = Some("7".into());
    j
}

/// No hub in the cache: the API server is asked before one is created.
async fn expect_no_pods(h: &mut Handle) {
    let path = "/api/v1/namespaces/backups/pods/web-01-b2-hub";
    expect(h, "GET", path, 404, not_found()).await;
}

/// The job's metadata as the API server has it now, at `version`.
async fn expect_job_version(h: &mut Handle, version: &str) {
    expect(
        h,
        "GET",
        &format!("{JOBS}/web-01-b2"),
        200,
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": "web-01-b2", "namespace": "backups", "resourceVersion": version}}),
    )
    .await;
}

/// A reconcile of a cached copy older than the API server's (the operator's own status write
/// not yet seen) creates nothing and looks again soon.
#[tokio::test]
async fn a_stale_copy_of_a_job_creates_no_pod() {
    let (ctx, mut h) = context();
    let j = planned_job();
    let run = tokio::spawn(reconcile(Arc::new(j), ctx));
    expect_no_pods(&mut h).await;
    expect_job_version(&mut h, "8").await;
    let action = reconciled(run).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    // The reconcile ended and dropped its client: any request it made is still queued.
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_millis(100), h.next_request()).await,
            Ok(Some(_))
        ),
        "nothing was sent after the version was read"
    );
}

#[tokio::test]
async fn a_planned_job_without_pods_gets_its_hub_pod() {
    let (ctx, mut h) = context();
    let j = planned_job();
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect_no_pods(&mut h).await;
    // The job read is the API server's current one: the hub may be created from it.
    expect_job_version(&mut h, "7").await;
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
    // No CA yet: one is made and stored in the operator's namespace, then the attempt's
    // certificates go into the job's Secret, before the hub that mounts them.
    expect(
        &mut h,
        "GET",
        "/api/v1/namespaces/sendense-system/secrets/sendense-nbd-ca",
        404,
        not_found(),
    )
    .await;
    let ca = expect(
        &mut h,
        "POST",
        "/api/v1/namespaces/sendense-system/secrets",
        201,
        json!({"metadata": {"name": "sendense-nbd-ca"}}),
    )
    .await;
    assert_eq!(ca["metadata"]["name"], "sendense-nbd-ca");
    assert!(ca["data"]["ca.key"].is_string() && ca["data"]["ca.crt"].is_string());
    let secret = expect(
        &mut h,
        "PATCH",
        "/api/v1/namespaces/backups/secrets/web-01-b2-nbd-tls",
        200,
        json!({"metadata": {"name": "web-01-b2-nbd-tls"}}),
    )
    .await;
    assert_eq!(secret["data"]["ca-cert.pem"], ca["data"]["ca.crt"]);
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["name"],
        "web-01-b2"
    );
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
    assert_eq!(
        pod["spec"]["volumes"][1]["secret"]["secretName"],
        "web-01-b2-nbd-tls"
    );
    // The hub's UID is recorded: losing that pod fails the attempt.
    let patch = expect_status_patch(&mut h, &j).await;
    assert_eq!(
        patch["status"]["pods"],
        json!([{"name": "web-01-b2-hub", "uid": "hub-uid-1"}])
    );
    // With the wait for it to serve, in the same write (and its Event).
    assert_eq!(cond(&patch, "Running")["reason"], "HubStarting");
    let ev = expect(&mut h, "POST", EVENTS, 201, json!({})).await;
    assert_eq!(ev["reason"], "HubStarting");
    let action = reconciled(run).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
}

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
async fn until_status_patch(h: &mut Handle, job: &BackupJob) -> Value {
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

#[tokio::test]
async fn a_finished_job_only_makes_sure_its_pods_and_secret_are_gone() {
    let (ctx, mut h) = context();
    let j = job(json!({"phase": "Succeeded", "disks": [{"deviceKey": 2000, "port": 10100}]}));
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx.clone()));
    // No pod of it in the cache: none is deleted; its Secret is made sure of.
    expect(
        &mut h,
        "DELETE",
        "/api/v1/namespaces/backups/secrets/web-01-b2-nbd-tls",
        404,
        not_found(),
    )
    .await;
    let action = reconciled(run).await;
    assert_eq!(action, Action::await_change());
    // Reconciled again (its pods' events, a status write): it asks the API server nothing.
    let again = tokio::spawn(reconcile(Arc::new(j), ctx));
    assert_eq!(reconciled(again).await, Action::await_change());
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_millis(100), h.next_request()).await,
            Ok(Some(_))
        ),
        "a cleaned-up job makes no request"
    );
}
