//! The API calls of the main reconcile paths, against a scripted API server: each test
//! states the requests in order and what the server answers.

use super::*;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::Value;

use super::commit::until_status_patch;

pub(super) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    context_with_pods(Vec::new())
}

/// The context with these pods in the controller's pod cache.
pub(super) fn context_with_pods(pods: Vec<Value>) -> (Arc<Context>, Handle) {
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
        nbd_ca: None,
        allocation: tokio::sync::Mutex::new(()),
        caches,
    };
    (Arc::new(ctx), handle)
}

/// Expects `method path` next, answers `status` with `body`; returns the request body.
/// The job's status write; answers with the job as it was and returns the patch sent.
pub(super) async fn expect_status_patch(handle: &mut Handle, job: &BackupJob) -> Value {
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

pub(super) async fn expect(
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

/// The spawned reconcile's outcome; it must end within 10 s (no request left unanswered).
pub(super) async fn reconciled(
    run: tokio::task::JoinHandle<Result<Action, crate::backup_job::Error>>,
) -> Action {
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the reconcile ends within 10 s (no request left unanswered)")
        .expect("joined")
        .expect("reconciled")
}

pub(super) fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

pub(super) const JOBS: &str = "/apis/sendense.io/v1alpha1/namespaces/backups/backupjobs";
pub(super) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/backups/events";

pub(super) fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
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
pub(super) async fn expect_job_version(h: &mut Handle, version: &str) {
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

    // The copy this process's own last status write made is not read again: straight on to
    // the hub (its Repository is read next; gone here, which fails the attempt).
    let (ctx, mut h) = context();
    let j = planned_job();
    ctx.caches.wrote(&j, "7".into());
    let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
    expect_no_pods(&mut h).await;
    expect(
        &mut h,
        "GET",
        "/apis/sendense.io/v1alpha1/namespaces/backups/repositories/primary",
        404,
        not_found(),
    )
    .await;
    let patch = until_status_patch(&mut h, &j).await;
    assert!(patch.to_string().contains("RepositoryNotFound"), "{patch}");
    drop(h);
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
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
