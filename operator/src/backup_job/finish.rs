//! The end of an attempt and of a job: a copy done (change IDs recorded, hub and agent removed,
//! the commit next), a committed restore point (Succeeded, metrics), a failed attempt (pods
//! removed, then a retry or the job fails), the confirmation in vCenter that no snapshot of the
//! job is left, and, once a job has ended, its pods and the directories of its attempts
//! that did not commit removed.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use sendense_contract::result::BackupResult;
use sendense_crds::{BackupJob, Repository};

use super::context::Context;
use super::outcome::{Failure, FailureClass, FilesRemoved};
use super::snapshot::{Hunt, confirm_snapshot_removed, hunt_snapshot};
use super::status::{self, JobUpdate};
use crate::children::{ApiError, apply, delete_if_present, get};
use crate::pod_state::{self, PodPhase};
use crate::resources::{agent_name, claim_name, cleanup_name, cleanup_pod, commit_name, hub_name};
use crate::status::holding;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("removing its pods and Service: {0}")]
    Remove(#[source] ApiError),
    #[error("removing its partial files: {0}")]
    Cleanup(#[source] ApiError),
    #[error(transparent)]
    Status(ApiError),
}

/// Deletes the job's pods the cache holds (not those already being deleted), and once per
/// attempt its certificates' Secret. A pod created but not yet seen by the cache is deleted
/// when it is: its event re-runs the reconcile.
pub(super) async fn delete_job_pods(job: &BackupJob, ctx: &Context) -> Result<(), Error> {
    delete_pods(job, ctx, [agent_name(job), hub_name(job), commit_name(job)]).await?;
    // The attempt's certificates go with its hub and agent (the next attempt gets new ones).
    let ns = job.namespace().unwrap_or_default();
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    if ctx.caches.first(job, &format!("{attempt}/secret-removed")) {
        delete_if_present::<Secret>(&ctx.client, &ns, &crate::nbd_tls::secret_name(job))
            .await
            .map_err(Error::Remove)?;
    }
    Ok(())
}

/// Deletes those of the job's pods `names` the cache holds, not those already being deleted.
async fn delete_pods(
    job: &BackupJob,
    ctx: &Context,
    names: impl IntoIterator<Item = String>,
) -> Result<(), Error> {
    let ns = job.namespace().unwrap_or_default();
    for name in names {
        // Not listed yet (the process just started): deleted whatever the cache says.
        let being_deleted = match ctx.caches.pod(&ns, &name) {
            Some(pod) => pod.metadata.deletion_timestamp.is_some(),
            None if ctx.caches.pods_listed() => continue,
            None => false,
        };
        if !being_deleted {
            delete_if_present::<Pod>(&ctx.client, &ns, &name)
                .await
                .map_err(Error::Remove)?;
        }
    }
    Ok(())
}

/// The VM's name for metrics: as vCenter reported it, else as the spec names it.
fn metric_vm(job: &BackupJob) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.vm_name.clone())
        .or_else(|| job.spec.vm.name.clone())
        .or_else(|| job.spec.vm.instance_uuid.clone())
        .unwrap_or_default()
}

/// The agent succeeded: the copy is recorded, the agent goes and the commit follows (the hub
/// stops serving and commits when asked; it and the attempt's certificates go once the job is
/// finished).
pub async fn copied(job: &BackupJob, ctx: &Context, r: &BackupResult) -> Result<Action, Error> {
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    let mut u = JobUpdate::new(job);
    status::copied(&mut u, attempt, r);
    let vm = u.status.vm_name.clone().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    status::write(u, ctx).await.map_err(Error::Status)?;
    for d in r.disks.iter() {
        ctx.metrics
            .bytes_copied
            .with_label_values(&[&ns, &vm, &d.key.to_string()])
            .inc_by(d.bytes_to_copy);
    }
    delete_pods(job, ctx, [agent_name(job)]).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The restore point is committed: Succeeded, metrics; the hub goes.
pub async fn committed(
    job: &BackupJob,
    ctx: &Context,
    restore_point: &str,
) -> Result<Action, Error> {
    let mut u = JobUpdate::new(job);
    status::committed(&mut u, restore_point);
    let st = u.status.clone();
    status::write(u, ctx).await.map_err(Error::Status)?;
    let started = st
        .start_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now);
    let seconds = (Timestamp::now().as_millisecond() - started.as_millisecond()) as f64 / 1000.0;
    let vm = st.vm_name.clone().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    let m = &ctx.metrics;
    m.backups.with_label_values(&[&ns, &vm, "succeeded"]).inc();
    m.backup_duration.observe(seconds.max(0.0));
    m.last_success
        .with_label_values(&[&ns, &vm])
        .set(Timestamp::now().as_second());
    let copied: i64 = st.disks.iter().filter_map(|d| d.bytes_to_copy).sum();
    m.last_throughput
        .with_label_values(&[&ns, &vm])
        .set(copied.max(0) as f64 / seconds.max(0.001));
    delete_job_pods(job, ctx).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// One attempt failed: its pods go; the next attempt starts, or the job fails.
pub async fn attempt_failed(
    job: &BackupJob,
    ctx: &Context,
    failure: Failure,
    result: Option<&BackupResult>,
) -> Result<Action, Error> {
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    let allowed = job.spec.retry_limit.max(0) + 1;
    // Past the job's deadline no attempt follows, whatever ended this one (the agent stopping
    // itself at the deadline included).
    let failure = status::past_deadline(job, Timestamp::now(), failure);
    delete_job_pods(job, ctx).await?;
    let class = failure.reason.class();
    let last = attempt >= allowed || class == FailureClass::Fatal;
    // Before the job fails for good, a still-running agent is given its grace period to stop
    // and remove its own snapshot; the operator then looks for what is left. The same failure
    // is found again on the next reconcile.
    if last && agent_stopping(job, ctx).await? {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let mut u = JobUpdate::new(job);
    status::record_snapshot(&mut u, result);
    if !last {
        if class == FailureClass::Replan {
            status::replanning(&mut u, attempt, allowed, &failure);
        } else {
            status::retrying(&mut u, attempt, allowed, &failure);
        }
        status::write(u, ctx).await.map_err(Error::Status)?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    // The last attempt, or one no other attempt could mend: confirm no snapshot of this job is
    // left in vCenter.
    let (snapshot, message) = confirm_snapshot_removed(job, ctx, result).await;
    status::failed(&mut u, attempt, &failure, snapshot, message);
    status::write(u, ctx).await.map_err(Error::Status)?;
    let ns = job.namespace().unwrap_or_default();
    let vm = metric_vm(job);
    ctx.metrics
        .backups
        .with_label_values(&[&ns, &vm, "failed"])
        .inc();
    if !crate::status::ConditionReason::is_true(&snapshot) {
        ctx.metrics
            .snapshot_cleanup_failures
            .with_label_values(&[&ns, &vm])
            .inc();
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// True while the job's agent pod, not ended, is still within its grace period of stopping.
pub(super) async fn agent_stopping(job: &BackupJob, ctx: &Context) -> Result<bool, Error> {
    let ns = job.namespace().unwrap_or_default();
    let Some(agent) = get::<Pod>(&ctx.client, &ns, &agent_name(job))
        .await
        .map_err(Error::Remove)?
    else {
        return Ok(false);
    };
    if PodPhase::of(&agent).ended() {
        return Ok(false);
    }
    // A pod whose node is gone never finishes terminating: wait no longer than its grace
    // period and half a minute.
    let since = agent
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(0, |t| Timestamp::now().as_second() - t.0.as_second());
    Ok(since < crate::resources::AGENT_GRACE_SECONDS + 30)
}

/// Succeeded or Failed: no pod of the job remains; the directories of its attempts that did not
/// commit are removed; a snapshot still on the VM is hunted. The finalizer goes once all that
/// is done.
pub async fn finished(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let st = job.status.clone().unwrap_or_default();
    // Once per job and process (again if one of its pods shows up): the events of its pods
    // going away re-run this reconcile, which then asks the API server nothing.
    let pods = [agent_name(job), hub_name(job), commit_name(job)];
    if !ctx.caches.cleaned(job, &pods) {
        // Its slot is free: the SourceNode's queue moves now.
        super::wake_queue(job, ctx);
        delete_job_pods(job, ctx).await?;
        // The VM is free for the next backup: its snapshot is dealt with, the pods are going.
        if let Some(lease) = st.vm_lease.as_deref() {
            crate::vm_lease::release(
                &ctx.client,
                &ctx.lease_namespace,
                lease,
                &crate::vm_lease::holder(job),
            )
            .await
            .map_err(Error::Remove)?;
        }
        ctx.caches.mark_cleaned(job);
    }
    let hunt = match hunt_snapshot(job, ctx).await? {
        Hunt::Attempted => return Ok(Action::requeue(Duration::from_secs(1))),
        Hunt::Wait(d) => Some(d),
        Hunt::Done => None,
    };
    // What is left to do, once the cleanup is: the next hunt, or nothing.
    let idle = || hunt.map_or_else(Action::await_change, Action::requeue);
    let pending_cleanup = FilesRemoved::OUTSTANDING
        .iter()
        .any(|r| holding(&st.conditions, r).is_some());
    if !pending_cleanup {
        if hunt.is_none() {
            // Nothing left to do for it: it may be deleted at once.
            super::cancel::release(ctx, job)
                .await
                .map_err(Error::Remove)?;
        }
        return Ok(idle());
    }
    let files = status::uncommitted_dirs(job);
    let name = cleanup_name(job);
    let pod = get::<Pod>(&ctx.client, &ns, &name)
        .await
        .map_err(Error::Cleanup)?;
    let Some(pod) = pod else {
        return start_cleanup(job, ctx, &files).await;
    };
    if pod_state::is_terminating(&pod) {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let mut u = JobUpdate::new(job);
    match PodPhase::of(&pod) {
        PodPhase::Succeeded => u.set(
            &FilesRemoved::Removed,
            format!("removed the attempts' directories {files:?}"),
        ),
        PodPhase::Failed => {
            let why = pod_state::failure(&pod).unwrap_or_else(|| "the cleanup pod failed".into());
            u.set(
                &FilesRemoved::RemovalFailed,
                format!("the attempts' directories {files:?} may remain: {why}"),
            );
        }
        _ => return Ok(Action::requeue(Duration::from_secs(3))),
    }
    status::write(u, ctx).await.map_err(Error::Status)?;
    delete_if_present::<Pod>(&ctx.client, &ns, &name)
        .await
        .map_err(Error::Cleanup)?;
    Ok(idle())
}

/// Starts the pod removing the directories of the job's attempts that did not commit.
pub(super) async fn start_cleanup(
    job: &BackupJob,
    ctx: &Context,
    files: &[String],
) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let repo_name = &job.spec.repository_ref.name;
    let repo = get::<Repository>(&ctx.client, &ns, repo_name)
        .await
        .map_err(Error::Cleanup)?;
    let Some(repo) = repo else {
        let mut u = JobUpdate::new(job);
        u.set(
            &FilesRemoved::RepositoryNotFound,
            format!("Repository {repo_name} is gone; the attempts' directories {files:?} were not removed"),
        );
        status::write(u, ctx).await.map_err(Error::Status)?;
        return Ok(Action::await_change());
    };
    let account = ctx.images.hub_service_account.as_deref();
    let pod = cleanup_pod(job, &claim_name(&repo), files, &ctx.images);
    let created = async {
        ctx.ensure_account(&ns, account).await?;
        apply(&ctx.client, &ns, &pod).await
    }
    .await;
    match created {
        Ok(()) => Ok(Action::requeue(Duration::from_secs(3))),
        Err(e) => {
            let Some(why) = e.refusal() else {
                return Err(Error::Cleanup(e));
            };
            let mut u = JobUpdate::new(job);
            u.set(
                &FilesRemoved::CleanupPodRejected,
                format!(
                    "the attempts' directories {files:?} are not removed yet: the API server refused {} {}: {why}",
                    e.kind, e.name
                ),
            );
            status::write(u, ctx).await.map_err(Error::Status)?;
            Ok(Action::requeue(Duration::from_secs(60)))
        }
    }
}
