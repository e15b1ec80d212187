//! The BackupJob controller: the data flow of one backup, as a pipeline of small steps whose
//! state lives only in the job's status and in its pods (deterministic names, labelled with the
//! attempt), so an operator restart resumes where the last one stopped.
//!
//! Pending: `dereference` (SourceNode and Repository Ready, the VM and its disks from vCenter,
//! the namespace's jobs under the allocation lock) -> `plan` (pure: chain parent, full or
//! incremental per disk, ports, files) -> recorded in status. Running (`run`): hub Pod; once the hub is Ready, the agent Pod; progress polled from the agent. `finish`: success
//! (change IDs recorded, pods removed) or a failed attempt (pods removed, retried up to
//! spec.retryLimit) -> Failed (snapshot removal confirmed in vCenter, partial QCOW2 files
//! removed by a short cleanup pod). Every step either goes on or stops with a requeue.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use sendense_crds::BackupJob;
use sendense_crds::backup_job::Phase;

use crate::children::ApiError;
use crate::vm_lease;
use outcome::{Wait, WaitReason};

/// The value of a step that may stop: its output, or return the stop from the calling step.
macro_rules! step {
    ($flow:expr) => {
        match $flow {
            std::ops::ControlFlow::Continue(value) => value,
            std::ops::ControlFlow::Break(stop) => return Ok(std::ops::ControlFlow::Break(stop)),
        }
    };
}

/// The value of a step that may stop with an Action: its output, or return that Action.
macro_rules! proceed {
    ($flow:expr) => {
        match $flow {
            std::ops::ControlFlow::Continue(value) => value,
            std::ops::ControlFlow::Break(action) => return Ok(action),
        }
    };
}

mod agent_state;
mod caches;
mod cancel;
mod commit;
mod context;
mod dereference;
mod finish;
mod outcome;
mod plan;
mod pod_inputs;
mod run;
mod snapshot;
mod status;
#[cfg(test)]
mod tests;

use caches::Admission;
pub use caches::Caches;
pub use context::Context;

/// True while a finished job's snapshot is still on the VM and the operator keeps removing it.
pub fn snapshot_pending_removal(job: &BackupJob) -> bool {
    let Some(st) = job.status.as_ref() else {
        return false;
    };
    matches!(st.phase, Some(Phase::Succeeded | Phase::Failed))
        && outcome::SnapshotRemoved::HUNTED
            .iter()
            .any(|r| crate::status::holding(&st.conditions, r).is_some())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BackupJob {job}: {source}")]
    Dereference {
        job: String,
        #[source]
        source: dereference::Error,
    },
    #[error("BackupJob {job}: {source}")]
    Run {
        job: String,
        #[source]
        source: run::Error,
    },
    #[error("BackupJob {job}: {source}")]
    Finish {
        job: String,
        #[source]
        source: finish::Error,
    },
    #[error("BackupJob {job}: {source}")]
    Status {
        job: String,
        #[source]
        source: ApiError,
    },
    #[error("BackupJob {job}: cancelling it: {source}")]
    Cancel {
        job: String,
        #[source]
        source: cancel::Error,
    },
    #[error("BackupJob {job}: the VM's Lease: {source}")]
    Lease {
        job: String,
        #[source]
        source: ApiError,
    },
}

impl Error {
    /// The `error` label of the failure metric: every step fails only on the API server.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Dereference { .. }
            | Error::Run { .. }
            | Error::Finish { .. }
            | Error::Status { .. }
            | Error::Lease { .. }
            | Error::Cancel { .. } => "kube_api",
        }
    }
}

/// How often a queued job looks at the caches by itself (a job ending wakes the first in line
/// at once: `wake_queue`).
const QUEUE_RECHECK: Duration = Duration::from_secs(30);

/// The jobs of the SourceNode `job` names, from the controller's cache.
fn same_source_node(job: &BackupJob, ctx: &Context) -> Vec<Arc<BackupJob>> {
    let ns = job.namespace();
    ctx.caches
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace() == ns && j.spec.source_node_ref == job.spec.source_node_ref)
        .collect()
}

/// The job's SourceNode, from the cache.
fn cached_source_node(job: &BackupJob, ctx: &Context) -> Option<Arc<sendense_crds::SourceNode>> {
    let ns = job.namespace().unwrap_or_default();
    let key = ObjectRef::new(&job.spec.source_node_ref.name).within(&ns);
    ctx.caches.source_nodes.get(&key)
}

/// The wait of a job whose SourceNode's slots the caches show taken: it waits (or goes on
/// waiting) in the queue without a request: no vCenter login, no list of the jobs or restore
/// points. A job not queued yet is queued so only when its SourceNode and Repository are
/// Ready in the caches (a job that cannot run for another reason says that reason first). A
/// cache that trails can only show a slot taken that has since freed: the job ending wakes
/// the queue, and the dereference under the allocation lock decides with fresh lists. A job
/// the caches let pass is admitted (`Caches::admit`): it holds its slot in this process until
/// its plan is in the cache, so a burst of new jobs is queued here, not after a vCenter login
/// and the lists each. A cache that trails can also hide a job running: then the fresh lists
/// queue the job all the same (as before the admission).
fn queued<'c>(job: &BackupJob, ctx: &'c Context) -> Result<Option<Admission<'c>>, Wait> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let Some(sn) = cached_source_node(job, ctx) else {
        return Ok(None);
    };
    if !plan::in_queue(job) {
        let ns = job.namespace().unwrap_or_default();
        let ready = |c: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>| {
            sendense_crds::conditions::is_true(c.unwrap_or_default(), "Ready")
        };
        let repo_ready = ctx
            .caches
            .repository(&ns, &job.spec.repository_ref.name)
            .is_some_and(|r| ready(r.status.as_ref().map(|s| s.conditions.as_slice())));
        if !repo_ready || !ready(sn.status.as_ref().map(|s| s.conditions.as_slice())) {
            return Ok(None);
        }
    }
    let jobs = same_source_node(job, ctx);
    let jobs: Vec<&BackupJob> = jobs.iter().map(AsRef::as_ref).collect();
    ctx.caches
        .admit(job, &sn, |in_flight| {
            plan::slot_wait(job, &sn, &jobs, in_flight)
        })
        .map(Some)
}

/// The job ended: its slot is free, so the jobs first in its SourceNode's queue are reconciled
/// now rather than at their next look.
fn wake_queue(job: &BackupJob, ctx: &Context) {
    let jobs = same_source_node(job, ctx);
    let mut queued: Vec<&Arc<BackupJob>> = jobs.iter().filter(|j| plan::in_queue(j)).collect();
    if queued.is_empty() {
        return;
    }
    queued.sort_by_key(|j| (j.metadata.creation_timestamp.clone(), j.name_any()));
    let running = jobs
        .iter()
        .filter(|j| {
            matches!(
                j.status.as_ref().and_then(|s| s.phase),
                Some(Phase::Running)
            )
        })
        .count();
    let limit = cached_source_node(job, ctx).map_or(1, |sn| plan::max_jobs(&sn));
    let free = limit.saturating_sub(running).max(1);
    for j in queued.into_iter().take(free) {
        let _ = ctx
            .caches
            .wake
            .unbounded_send(ObjectRef::from_obj(j.as_ref()));
    }
}

/// Pending: dereference, plan, and the plan (or the reason to wait) into status.
async fn start(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let admission = match queued(job, ctx) {
        Ok(admission) => admission,
        Err(wait) => {
            if !plan::in_queue(job) {
                let mut u = status::JobUpdate::new(job);
                status::waiting(&mut u, &wait);
                status::write(u, ctx)
                    .await
                    .map_err(|source| Error::Status {
                        job: job.name_any(),
                        source,
                    })?;
            }
            return Ok(Action::requeue(QUEUE_RECHECK));
        }
    };
    let name = job.name_any();
    let dereferenced =
        dereference::dereference(ctx, job)
            .await
            .map_err(|source| Error::Dereference {
                job: name.clone(),
                source,
            })?;
    let mut u = status::JobUpdate::new(job);
    let action = match dereferenced {
        ControlFlow::Break(wait) => {
            status::waiting(&mut u, &wait);
            Action::requeue(wait.reason.retry())
        }
        // This reconcile's copy of the job is older than the one just listed under the lock
        // (its own plan or wait, written by an earlier reconcile, not yet in the cache): it
        // must not plan again (other ports, the status overwritten).
        ControlFlow::Continue((refs, _allocation))
            if refs.jobs.iter().any(|j| {
                j.uid() == job.uid() && j.resource_version() != job.resource_version()
            }) =>
        {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        // The allocation lock is held until the plan is written.
        ControlFlow::Continue((refs, _allocation)) => match plan::plan(job, &refs) {
            Err(wait) => {
                status::waiting(&mut u, &wait);
                Action::requeue(wait.reason.retry())
            }
            Ok(plan) => {
                let vm = plan.vm_name.clone();
                // One backup per VM at a time, cluster-wide.
                let lease = vm_lease::lease_name(&refs.vcenter_identity, &refs.vm_instance_uuid);
                let held = vm_lease::acquire(
                    &ctx.client,
                    &ctx.lease_namespace,
                    &lease,
                    &vm_lease::holder(job),
                    &vm,
                )
                .await
                .map_err(|source| Error::Lease {
                    job: name.clone(),
                    source,
                })?;
                if let Err(vm_lease::HeldBy(other)) = held {
                    let wait = Wait::new(
                        WaitReason::VmBusy,
                        format!(
                            "{other} holds VM {vm} (the same VM of the same vCenter: a backup, or a restore in place); this one starts when it ends"
                        ),
                    );
                    status::waiting(&mut u, &wait);
                    status::write(u, ctx)
                        .await
                        .map_err(|source| Error::Status { job: name, source })?;
                    return Ok(Action::requeue(wait.reason.retry()));
                }
                // Deleting a running job cancels it cleanly (cancel.rs).
                cancel::guard(ctx, job)
                    .await
                    .map_err(|source| Error::Lease {
                        job: name.clone(),
                        source,
                    })?;
                status::started(&mut u, plan);
                u.status.vm_lease = Some(lease);
                status::write(u, ctx)
                    .await
                    .map_err(|source| Error::Status { job: name, source })?;
                if let Some(a) = admission {
                    a.planned();
                }
                ctx.metrics.backups_started.inc();
                ctx.metrics
                    .known_vm(&job.namespace().unwrap_or_default(), &vm);
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
        },
    };
    status::write(u, ctx)
        .await
        .map_err(|source| Error::Status { job: name, source })?;
    Ok(action)
}

/// True once the plan is in status: every disk has its port.
fn planned(job: &BackupJob) -> bool {
    job.status
        .as_ref()
        .is_some_and(|s| !s.disks.is_empty() && s.disks.iter().all(|d| d.port.is_some()))
}

pub async fn reconcile(job: Arc<BackupJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("backupjob");
    let name = job.name_any();
    let phase = job.status.as_ref().and_then(|s| s.phase);
    let ended = matches!(phase, Some(Phase::Succeeded | Phase::Failed));
    if job.metadata.deletion_timestamp.is_some() && !ended {
        return cancel::deleted(&job, &ctx)
            .await
            .map_err(|source| Error::Cancel { job: name, source });
    }
    match phase {
        Some(Phase::Succeeded | Phase::Failed) => finish::finished(&job, &ctx)
            .await
            .map_err(|source| Error::Finish { job: name, source }),
        _ if planned(&job) => run::run(&job, &ctx)
            .await
            .map_err(|source| Error::Run { job: name, source }),
        _ => start(&job, &ctx).await,
    }
}

pub fn error_policy(job: Arc<BackupJob>, err: &Error, ctx: Arc<Context>) -> Action {
    let label = err.metric_label();
    ctx.metrics
        .failed_reconcile("backupjob", &job.name_any(), err, label);
    Action::requeue(Duration::from_secs(10))
}

/// BackupJobs that refer to a SourceNode or Repository, for `.watches()`.
pub fn jobs_referring(
    jobs: &[Arc<BackupJob>],
    namespace: Option<&str>,
    source_node: Option<&str>,
    repository: Option<&str>,
) -> Vec<ObjectRef<BackupJob>> {
    jobs.iter()
        .filter(|j| j.metadata.namespace.as_deref() == namespace)
        .filter(|j| {
            !matches!(
                j.status.as_ref().and_then(|s| s.phase),
                Some(Phase::Succeeded)
            )
        })
        .filter(|j| {
            source_node.is_some_and(|s| j.spec.source_node_ref.name == s)
                || repository.is_some_and(|r| j.spec.repository_ref.name == r)
        })
        .map(|j| ObjectRef::from_obj(j.as_ref()))
        .collect()
}
