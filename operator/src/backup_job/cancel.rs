//! A BackupJob deleted before it ended: it is cancelled, not abandoned. While a job runs it
//! carries the finalizer `sendense.io/cleanup`, so the API server keeps it until the operator
//! has stopped its pods (the agent gets its grace period to remove its own snapshot), made sure
//! no snapshot of it is left in vCenter, removed the directories of its attempts that did not
//! commit, and released the VM's Lease. Then the finalizer goes and so does the job. A finished
//! job has nothing left to do and no finalizer: it is deleted at once.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, Repository};

use super::context::Context;
use super::finish;
use super::status;
use crate::children::{ApiError, Verb, delete_if_present, get};
use crate::pod_state::{self, PodPhase};
use crate::resources::cleanup_name;

/// The finalizer a running BackupJob carries.
pub const FINALIZER: &str = "sendense.io/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Finish(#[from] finish::Error),
}

fn has_finalizer(job: &BackupJob) -> bool {
    job.finalizers().iter().any(|f| f == FINALIZER)
}

/// Applies a JSON patch of the job's finalizers.
async fn patch_finalizers(
    ctx: &Context,
    job: &BackupJob,
    ops: serde_json::Value,
) -> Result<(), ApiError> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let patch = serde_json::from_value(ops).map_err(|e| {
        ApiError::new::<BackupJob>(Verb::Apply, &ns, &name, kube::Error::SerdeError(e))
    })?;
    Api::<BackupJob>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map(|_| ())
        .map_err(|e| ApiError::new::<BackupJob>(Verb::Apply, &ns, &name, e))
}

/// Adds the finalizer to a job about to start (a no-op when it has it).
pub async fn guard(ctx: &Context, job: &BackupJob) -> Result<(), ApiError> {
    if has_finalizer(job) {
        return Ok(());
    }
    let ops = if job.finalizers().is_empty() {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    } else {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}])
    };
    patch_finalizers(ctx, job, ops).await
}

/// Removes the finalizer (a no-op when it is not there); only that entry, checked in place.
pub async fn release(ctx: &Context, job: &BackupJob) -> Result<(), ApiError> {
    let Some(i) = job.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{i}");
    let ops = serde_json::json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path}
    ]);
    match patch_finalizers(ctx, job, ops).await {
        // The list changed since it was read (the test failed): the next reconcile looks again.
        Err(e) if matches!(&e.source, kube::Error::Api(s) if s.code == 422) => Ok(()),
        r => r,
    }
}

/// The job is being deleted before it ended: cancel what runs, clean up, then let it go. (A
/// job that ended is finished by `finish::finished`, which lets it go once its cleanup is done.)
pub async fn deleted(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    if !has_finalizer(job) {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    {
        // Stop the attempt: its pods go; the agent removes its snapshot on SIGTERM.
        finish::delete_job_pods(job, ctx).await?;
        if finish::agent_stopping(job, ctx).await? {
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        let (snapshot, message) = super::snapshot::confirm_snapshot_removed(job, ctx, None).await;
        tracing::info!(job = %job.name_any(), ?snapshot, "deleted while it ran: {message}");
        // Every attempt's directory, none of which committed (a manifest already written
        // makes `hub remove` refuse its directory: the repository probe then lists it).
        let mut gone = job.clone();
        if let Some(st) = gone.status.as_mut() {
            st.phase = Some(Phase::Failed);
        }
        let dirs = status::uncommitted_dirs(&gone);
        let repo = &job.spec.repository_ref.name;
        let repo_there = get::<Repository>(&ctx.client, &ns, repo).await?.is_some();
        if !dirs.is_empty() && repo_there {
            let name = cleanup_name(job);
            match get::<Pod>(&ctx.client, &ns, &name).await? {
                None => {
                    finish::start_cleanup(job, ctx, &dirs).await?;
                    return Ok(Action::requeue(Duration::from_secs(3)));
                }
                Some(p) if !PodPhase::of(&p).ended() && !pod_state::is_terminating(&p) => {
                    return Ok(Action::requeue(Duration::from_secs(3)));
                }
                Some(p) => {
                    if PodPhase::of(&p) == PodPhase::Failed {
                        tracing::warn!(
                            job = %job.name_any(),
                            "the directories {dirs:?} of the deleted job may remain: {}",
                            pod_state::failure(&p).unwrap_or_default()
                        );
                    }
                    delete_if_present::<Pod>(&ctx.client, &ns, &name).await?;
                }
            }
        }
    }
    if let Some(lease) = job.status.as_ref().and_then(|s| s.vm_lease.as_deref()) {
        crate::vm_lease::release(
            &ctx.client,
            &ctx.lease_namespace,
            lease,
            &crate::vm_lease::holder(job),
        )
        .await?;
    }
    release(ctx, job).await?;
    Ok(Action::await_change())
}
