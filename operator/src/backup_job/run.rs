//! A planned job's attempt, as small steps, each either going on or stopping the reconcile
//! with a requeue: clear pods of an earlier attempt -> wait out a retry's back-off -> ensure the
//! hub -> wait for the hub to serve -> ensure the agent -> observe the agent (progress into
//! status; its end is handed to `finish`).

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use sendense_contract::result::BackupResult;
use sendense_crds::{BackupJob, Repository, SourceNode};

use super::agent_state::AgentState;
use super::context::Context;
use super::finish;
use super::outcome::{Failure, FailureReason, JobPod, Running, retry_backoff};
use super::status::{self, JobUpdate};
use crate::children::{
    ApiError, Namespaced, applied, apply, delete_if_present, force_delete, get, is_current,
};
use crate::pod_state;
use crate::resources::{
    ATTEMPT_LABEL, HubTls, PROGRESS_PORT, agent_name, agent_pod, agent_policy, claim_name,
    hub_name, hub_pod, hub_policy,
};
use crate::status::holding;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading its pods: {0}")]
    Pods(#[source] ApiError),
    #[error("removing pods of an earlier attempt: {0}")]
    StalePods(#[source] ApiError),
    #[error("starting the hub: {0}")]
    Hub(#[source] ApiError),
    #[error("starting the agent: {0}")]
    Agent(#[source] ApiError),
    #[error("asking the hub to commit: {0}")]
    Commit(#[source] ApiError),
    #[error("recording the restore point: {0}")]
    RestorePoint(#[source] ApiError),
    #[error(transparent)]
    Status(ApiError),
    #[error(transparent)]
    Finish(#[from] finish::Error),
}

/// A step's outcome: go on with its output, or stop with this requeue.
type Step<T> = Result<ControlFlow<Action, T>, Error>;

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

/// The attempt a pod was created for.
pub(super) fn attempt_of(pod: &Pod) -> Option<i32> {
    pod.labels().get(ATTEMPT_LABEL)?.parse().ok()
}

pub(super) fn for_attempt(mut pod: Pod, attempt: i32) -> Pod {
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(ATTEMPT_LABEL.into(), attempt.to_string());
    pod
}

/// One of the attempt's pods; None when it does not exist. From the pods' cache; a pod the
/// cache does not hold (not seen yet, or gone) is read from the API server, so nothing is
/// created or concluded lost from a cache that trails.
pub(super) async fn read_pod(ctx: &Context, ns: &str, name: &str) -> Result<Option<Pod>, Error> {
    if let Some(pod) = ctx.caches.pod(ns, name) {
        return Ok(Some(pod));
    }
    get::<Pod>(&ctx.client, ns, name).await.map_err(Error::Pods)
}

/// The job this reconcile read is older than the API server's (see `children::is_current`):
/// no pod is created from it.
pub(super) async fn stale(job: &BackupJob, ctx: &Context) -> Result<bool, Error> {
    // The copy this process's own last status write made needs no read: only another writer
    // can have changed it since, and what the check guards against is this process's writes.
    if ctx.caches.is_own_last_write(job) {
        return Ok(false);
    }
    Ok(!is_current(&ctx.client, job).await.map_err(Error::Pods)?)
}

/// An object the attempt needs (its Repository, its SourceNode): the controller's cached copy
/// when it holds one (only its spec is used: the claim, the vCenter); else read from the API
/// server, and missing there, it fails the attempt (a job fails only on the API server's word).
async fn still_there<K: Namespaced + Clone>(
    job: &BackupJob,
    ctx: &Context,
    (name, cached): (&str, Option<Arc<K>>),
    reason: FailureReason,
    error: fn(ApiError) -> Error,
) -> Step<K> {
    if let Some(obj) = cached {
        return Ok(Continue(obj.as_ref().clone()));
    }
    let ns = job.namespace().unwrap_or_default();
    match get::<K>(&ctx.client, &ns, name).await.map_err(error)? {
        Some(obj) => Ok(Continue(obj)),
        None => {
            let message = format!("{} {name} no longer exists", K::kind(&()));
            fail(job, ctx, Failure::new(reason, message), None).await
        }
    }
}

/// Writes a Running message and stops with a requeue.
async fn say<T>(job: &BackupJob, ctx: &Context, running: Running, message: String) -> Step<T> {
    let mut u = JobUpdate::new(job);
    u.set(&running, message);
    status::write(u, ctx).await.map_err(Error::Status)?;
    Ok(Break(requeue(3)))
}

/// Least time between two reads of a running agent's progress (it is read every 3 s).
const PROGRESS_POLL: Duration = Duration::from_millis(2500);

/// Seconds between two tries of a pod the API server refused.
const REFUSED_RETRY_SECONDS: u64 = 30;

/// Creating `pod` (or an object it needs) failed. A refusal by the API server (quota, Pod
/// Security admission, a policy) goes into the Running condition with the API's own message,
/// and so into a Warning Event; the step is tried again later, when a quota may have freed up
/// or a policy changed. Any other failure is the reconcile's error (logged, retried).
pub(super) async fn refused<T>(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    pod: JobPod,
    e: ApiError,
    wrap: fn(ApiError) -> Error,
) -> Step<T> {
    let Some(why) = e.refusal() else {
        return Err(wrap(e));
    };
    let message = format!(
        "attempt {attempt}: the API server refused {} {}: {why}",
        e.kind, e.name
    );
    let mut u = JobUpdate::new(job);
    u.set(&Running::Refused(pod), message);
    status::write(u, ctx).await.map_err(Error::Status)?;
    Ok(Break(requeue(REFUSED_RETRY_SECONDS)))
}

/// A failed attempt, as a step's stop.
async fn fail<T>(
    job: &BackupJob,
    ctx: &Context,
    failure: Failure,
    result: Option<&BackupResult>,
) -> Step<T> {
    Ok(Break(
        finish::attempt_failed(job, ctx, failure, result).await?,
    ))
}

/// Step 1: pods of an earlier attempt go first; the new attempt starts when they are gone.
async fn clear_stale(
    ctx: &Context,
    ns: &str,
    attempt: i32,
    existing: [&Option<Pod>; 2],
) -> Step<()> {
    let mut stale = false;
    for p in existing.into_iter().flatten() {
        if attempt_of(p) != Some(attempt) || pod_state::is_terminating(p) {
            stale = true;
            if !pod_state::is_terminating(p) {
                delete_if_present::<Pod>(&ctx.client, ns, &p.name_any())
                    .await
                    .map_err(Error::StalePods)?;
            } else if pod_state::kubelet_gone(p, Timestamp::now()) {
                // Its node no longer answers (gone, cut off): the pod would stay Terminating
                // for good. The next attempt writes other files from another snapshot, so
                // nothing of it can be harmed by a container still running out there.
                tracing::warn!(pod = %p.name_any(), "force-deleting a pod whose kubelet does not confirm its deletion");
                force_delete::<Pod>(&ctx.client, ns, &p.name_any())
                    .await
                    .map_err(Error::StalePods)?;
            }
        }
    }
    Ok(if stale {
        Break(requeue(2))
    } else {
        Continue(())
    })
}

/// Step 2: a retry waits out its back-off, counted from the failure of the previous attempt.
fn back_off(job: &BackupJob, attempt: i32) -> ControlFlow<Action> {
    let conds = job
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if let Some(c) = holding(conds, &Running::Retrying) {
        let since = Timestamp::now().as_millisecond() - c.last_transition_time.0.as_millisecond();
        let left = retry_backoff(attempt).as_millis() as i64 - since;
        if left > 0 {
            return Break(Action::requeue(Duration::from_millis(left as u64)));
        }
    }
    Continue(())
}

/// Step 3: the hub's Pod exists (created now when missing).
async fn ensure_hub(job: &BackupJob, ctx: &Context, attempt: i32, hub: Option<Pod>) -> Step<Pod> {
    let ns = job.namespace().unwrap_or_default();
    if let Some(hub) = hub {
        return Ok(Continue(hub));
    }
    // Not in the cache: it may exist all the same (created, not yet seen).
    if let Some(hub) = read_pod(ctx, &ns, &hub_name(job)).await? {
        return Ok(Continue(hub));
    }
    if stale(job, ctx).await? {
        return Ok(Break(requeue(1)));
    }
    let repo_name = &job.spec.repository_ref.name;
    let repo: Repository = step!(
        still_there(
            job,
            ctx,
            (repo_name, ctx.caches.repository(&ns, repo_name)),
            FailureReason::RepositoryNotFound,
            Error::Hub
        )
        .await?
    );
    let disks = status::hub_disks(job);
    // The attempt's certificates, issued before its hub exists (its pods mount them).
    // A CA that cannot be read or stored is said in status (under the progress deadline).
    let tls = HubTls::of(job, attempt);
    let now = time::OffsetDateTime::now_utc();
    let issued = async {
        let watched = ctx
            .nbd_ca
            .as_ref()
            .and_then(|s| s.get(&ObjectRef::new(&ctx.nbd_ca_secret).within(&ctx.lease_namespace)));
        crate::nbd_tls::current_ca(
            &ctx.client,
            &ctx.lease_namespace,
            &ctx.nbd_ca_secret,
            now,
            watched.as_deref(),
        )
        .await?
        .issue(
            &tls.server_name,
            &crate::nbd_tls::client_name(job, attempt),
            now,
            crate::nbd_tls::JOB_CERT_VALID_DAYS,
        )
    };
    let certs = match issued.await {
        Ok(c) => c,
        Err(e) => {
            let message = format!("attempt {attempt}: issuing the hub's NBD certificates: {e}");
            return say(job, ctx, Running::HubStarting, message).await;
        }
    };
    let secret = crate::nbd_tls::attempt_secret(job, &certs);
    let pod = hub_pod(job, &claim_name(&repo), &disks, &tls, &ctx.images);
    let account = ctx.images.hub_service_account.as_deref();
    let created = async {
        ctx.ensure_account(&ns, account).await?;
        apply(&ctx.client, &ns, &secret).await?;
        if let Some(operator) = &ctx.images.network_policy {
            apply(&ctx.client, &ns, &hub_policy(job, &disks)).await?;
            apply(&ctx.client, &ns, &agent_policy(job, operator)).await?;
        }
        applied(&ctx.client, &ns, &for_attempt(pod, attempt)).await
    }
    .await;
    match created {
        Ok(pod) => {
            if pod.metadata.uid.is_some() {
                // Recorded with the wait that follows, in one write.
                let mut u = JobUpdate::new(job);
                status::created_pod(&mut u, &pod);
                u.set(&Running::HubStarting, hub_waiting(attempt, &pod));
                status::write(u, ctx).await.map_err(Error::Status)?;
            }
            Ok(Break(requeue(3)))
        }
        Err(e) => refused(job, ctx, attempt, JobPod::Hub, e, Error::Hub).await,
    }
}

/// Step 4: the hub serves its NBD exports; its IP.
async fn hub_ready(job: &BackupJob, ctx: &Context, attempt: i32, hub: &Pod) -> Step<String> {
    if let Some(why) = pod_state::failure(hub).or_else(|| pod_state::server_ended(hub)) {
        let failure = Failure::new(
            FailureReason::HubFailed,
            format!("hub pod {}: {why}", hub.name_any()),
        );
        return fail(job, ctx, failure, None).await;
    }
    if let (true, Some(ip)) = (pod_state::is_ready(hub), pod_state::ip(hub)) {
        return Ok(Continue(ip));
    }
    if let Some(why) = pod_state::unschedulable(hub) {
        let message = format!(
            "attempt {attempt}: hub pod {} cannot be scheduled: {why}",
            hub.name_any()
        );
        return say(job, ctx, Running::Unschedulable(JobPod::Hub), message).await;
    }
    let mut message = hub_waiting(attempt, hub);
    if let Some(why) = pod_state::waiting_problem(hub) {
        message = format!("{message} ({why})");
    }
    say(job, ctx, Running::HubStarting, message).await
}

fn hub_waiting(attempt: i32, hub: &Pod) -> String {
    format!(
        "attempt {attempt}: waiting for hub pod {} to serve its NBD exports",
        hub.name_any()
    )
}

/// Step 5: the agent pod exists (created now when missing), aimed at the hub's exports.
async fn ensure_agent(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    hub_ip: &str,
    agent: Option<Pod>,
) -> Step<Pod> {
    let ns = job.namespace().unwrap_or_default();
    if let Some(agent) = agent {
        return Ok(Continue(agent));
    }
    if let Some(agent) = read_pod(ctx, &ns, &agent_name(job)).await? {
        return Ok(Continue(agent));
    }
    if stale(job, ctx).await? {
        return Ok(Break(requeue(1)));
    }
    let sn_name = &job.spec.source_node_ref.name;
    let sn: SourceNode = step!(
        still_there(
            job,
            ctx,
            (sn_name, ctx.caches.source_node(&ns, sn_name)),
            FailureReason::SourceNodeNotFound,
            Error::Agent
        )
        .await?
    );
    let targets = status::targets(job, hub_ip);
    let pod = match agent_pod(job, &sn, targets, status::base_change_ids(job), &ctx.images) {
        Ok(pod) => pod,
        Err(not_allowed) => {
            // The SourceNode changed after the job was planned (its Ready condition says the
            // same): like a policy refusal, reported and tried again; the progress deadline
            // bounds the wait.
            let message = format!("attempt {attempt}: SourceNode {sn_name}: {not_allowed}");
            let mut u = JobUpdate::new(job);
            u.set(&Running::Refused(JobPod::Agent), message);
            status::write(u, ctx).await.map_err(Error::Status)?;
            return Ok(Break(requeue(REFUSED_RETRY_SECONDS)));
        }
    };
    let account = ctx.images.agent_service_account.as_deref();
    let created = async {
        ctx.ensure_account(&ns, account).await?;
        applied(&ctx.client, &ns, &for_attempt(pod, attempt)).await
    }
    .await;
    let pod = match created {
        Ok(pod) => pod,
        Err(e) => return refused(job, ctx, attempt, JobPod::Agent, e, Error::Agent).await,
    };
    let mut u = JobUpdate::new(job);
    status::created_pod(&mut u, &pod);
    u.set(
        &Running::AgentStarting,
        format!("attempt {attempt}: hub ready at {hub_ip}; starting the agent"),
    );
    status::write(u, ctx).await.map_err(Error::Status)?;
    Ok(Break(requeue(3)))
}

/// Step 6: the agent's progress into status while it runs; its end to `finish`.
async fn observe_agent(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    agent: &Pod,
) -> Result<Action, Error> {
    match AgentState::of(agent) {
        AgentState::Succeeded(r) => Ok(finish::copied(job, ctx, &r).await?),
        AgentState::Failed(failure, r) => {
            Ok(finish::attempt_failed(job, ctx, failure, r.as_ref()).await?)
        }
        AgentState::Running(ip) => {
            // At the poll's pace: the status write it makes (and pod events) re-run this
            // reconcile, which must not poll and write again at once.
            if let Some(ip) = ip.filter(|_| ctx.caches.poll_due(job, PROGRESS_POLL)) {
                match crate::agent_progress::fetch(&format!("{ip}:{PROGRESS_PORT}")).await {
                    Ok(p) => {
                        let mut u = JobUpdate::new(job);
                        status::progress(&mut u, attempt, &p);
                        status::write(u, ctx).await.map_err(Error::Status)?;
                    }
                    Err(e) => tracing::debug!(job = %job.name_any(), "progress: {e}"),
                }
            }
            Ok(requeue(3))
        }
        AgentState::Starting => {
            let (running, message) = match pod_state::unschedulable(agent) {
                Some(why) => (
                    Running::Unschedulable(JobPod::Agent),
                    format!(
                        "attempt {attempt}: agent pod {} cannot be scheduled: {why}",
                        agent.name_any()
                    ),
                ),
                None => {
                    let mut message = format!(
                        "attempt {attempt}: waiting for agent pod {} to start",
                        agent.name_any()
                    );
                    if let Some(why) = pod_state::waiting_problem(agent) {
                        message = format!("{message} ({why})");
                    }
                    (Running::AgentStarting, message)
                }
            };
            let mut u = JobUpdate::new(job);
            u.set(&running, message);
            status::write(u, ctx).await.map_err(Error::Status)?;
            Ok(requeue(3))
        }
    }
}

/// Running: the steps of one attempt, in order.
pub async fn run(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    // Past the job's deadline, or an attempt without progress (a hub never Ready, a pod never
    // scheduled, a frozen agent): nothing waits forever.
    if let Some(failure) = status::overdue(job, Timestamp::now()) {
        return Ok(finish::attempt_failed(job, ctx, failure, None).await?);
    }
    if status::is_copied(job) {
        return super::commit::commit(job, ctx, attempt).await;
    }
    // From the pods' cache; read from the API server only before a conclusion is drawn from
    // a pod's absence (it is created, or the attempt fails as having lost it).
    let mut hub = ctx.caches.pod(&ns, &hub_name(job));
    let mut agent = ctx.caches.pod(&ns, &agent_name(job));
    // A pod of this attempt lost (deleted, evicted, its node gone) is never replaced within
    // the attempt: the attempt fails, and the next one starts afresh.
    if status::lost_pod(job, &[&hub, &agent]).is_some() {
        hub = read_pod(ctx, &ns, &hub_name(job)).await?;
        agent = read_pod(ctx, &ns, &agent_name(job)).await?;
        if let Some(why) = status::lost_pod(job, &[&hub, &agent]) {
            // A copy older than this process's last write of the job (its copied status, after
            // which the agent was deleted on purpose) concludes nothing: the newer one is next.
            if stale(job, ctx).await? {
                return Ok(requeue(1));
            }
            let failure = Failure::new(FailureReason::PodLost, why);
            return Ok(finish::attempt_failed(job, ctx, failure, None).await?);
        }
    }
    proceed!(clear_stale(ctx, &ns, attempt, [&hub, &agent]).await?);
    proceed!(back_off(job, attempt));
    let hub = proceed!(ensure_hub(job, ctx, attempt, hub).await?);
    let hub_ip = proceed!(hub_ready(job, ctx, attempt, &hub).await?);
    let agent = proceed!(ensure_agent(job, ctx, attempt, &hub_ip, agent).await?);
    observe_agent(job, ctx, attempt, &agent).await
}
