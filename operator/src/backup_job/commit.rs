//! The last step of a successful attempt: its copied files become a restore point. The agent
//! is gone; the operator writes the attempt's manifest (without digests) into the hub pod's
//! commit annotation, which the kubelet hands to the hub's container as a file. The hub then
//! stops every qemu-nbd (nothing can write the files any more), reads each disk back through
//! its chain, writes the manifest next to the files and ends, the result (the disks' SHA-256)
//! as its termination message. The RestorePoint object is made from that; then the job is
//! Succeeded. A failed commit fails the attempt like any other failure: the next attempt
//! copies afresh into its own directory.
//!
//! The commit is bounded: the hub must end within `spec.progressDeadlineSeconds` plus the time
//! to read every disk back at `READ_BACK_FLOOR` bytes per second, counted from the copy's end.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use sendense_contract::manifest::{CommitResult, Manifest};
use sendense_crds::{BackupJob, RestorePoint, SourceNode};

use super::context::Context;
use super::finish;
use super::outcome::{Failure, FailureReason};
use super::run::{Error, attempt_of, read_pod, stale};
use crate::children::{annotate, create_if_missing, get};
use crate::pod_state::{self, PodPhase};
use crate::resources::{COMMIT_ANNOTATION, hub_name};
use crate::restore_point::{from_manifest, manifest};

/// The slowest read-back the commit's deadline allows for: 8 MiB/s.
pub const READ_BACK_FLOOR: u64 = 8 << 20;

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

async fn fail(job: &BackupJob, ctx: &Context, message: String) -> Result<Action, Error> {
    let failure = Failure::new(FailureReason::CommitFailed, message);
    Ok(finish::attempt_failed(job, ctx, failure, None).await?)
}

/// Seconds the commit of `m` may take: the job's progress deadline plus reading every disk
/// back at READ_BACK_FLOOR.
pub fn commit_limit(job: &BackupJob, m: &Manifest) -> i64 {
    let bytes: u64 = m.disks.iter().map(|d| d.capacity_bytes).sum();
    job.spec.progress_deadline_seconds + (bytes / READ_BACK_FLOOR) as i64
}

/// Commits the copied attempt.
pub async fn commit(job: &BackupJob, ctx: &Context, attempt: i32) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let sn_name = &job.spec.source_node_ref.name;
    let vcenter = match super::cached_source_node(job, ctx) {
        Some(sn) => Some(sn.spec.vcenter.url.clone()),
        None => get::<SourceNode>(&ctx.client, &ns, sn_name)
            .await
            .map_err(Error::Pods)?
            .map(|sn| sn.spec.vcenter.url),
    }
    .unwrap_or_default();
    let m = match manifest(job, &vcenter) {
        Ok(m) => m,
        Err(e) => return fail(job, ctx, format!("cannot describe the restore point: {e}")).await,
    };
    let name = hub_name(job);
    let hub = read_pod(ctx, &ns, &name)
        .await?
        .filter(|p| attempt_of(p) == Some(attempt));
    let Some(hub) = hub else {
        // Checked against the API server's copy of the job first: one this process has since
        // written Succeeded (and whose hub it deleted) is not failed from an older copy.
        if stale(job, ctx).await? {
            return Ok(requeue(1));
        }
        return fail(
            job,
            ctx,
            format!("hub pod {name} of attempt {attempt} is gone before it committed"),
        )
        .await;
    };
    let result = || CommitResult::parse(&pod_state::termination_message(&hub).unwrap_or_default());
    match PodPhase::of(&hub) {
        PodPhase::Succeeded => {
            let Some(r) = result().filter(|r| r.ok) else {
                return fail(
                    job,
                    ctx,
                    "the hub ended without a readable commit result".into(),
                )
                .await;
            };
            let mut m = m;
            for d in m.disks.iter_mut() {
                match r.disks.iter().find(|c| c.device_key == d.device_key) {
                    Some(c) => d.sha256 = c.sha256.clone(),
                    None => {
                        let message =
                            format!("the commit reported no digest of disk {}", d.device_key);
                        return fail(job, ctx, message).await;
                    }
                }
            }
            let rp = from_manifest(&m, &ns);
            create_if_missing::<RestorePoint>(&ctx.client, &ns, &rp)
                .await
                .map_err(Error::RestorePoint)?;
            Ok(finish::committed(job, ctx, &rp.name_any()).await?)
        }
        PodPhase::Failed => {
            let why = result()
                .and_then(|r| r.error)
                .or_else(|| pod_state::failure(&hub))
                .unwrap_or_else(|| "the hub failed".into());
            fail(job, ctx, format!("committing {}: {why}", m.directory)).await
        }
        _ => waiting(job, ctx, &hub, &m).await,
    }
}

/// The hub still runs: asked to commit once, then given until the commit's deadline.
async fn waiting(job: &BackupJob, ctx: &Context, hub: &Pod, m: &Manifest) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let name = hub.name_any();
    let now = Timestamp::now();
    if pod_state::kubelet_gone(hub, now) {
        return fail(
            job,
            ctx,
            format!("the node of hub pod {name} stopped answering before the hub committed"),
        )
        .await;
    }
    let request = m.to_json();
    // A hub being deleted or evicted is not asked: its end, with its result, is what counts.
    if !pod_state::is_terminating(hub) && hub.annotations().get(COMMIT_ANNOTATION) != Some(&request)
    {
        let uid = hub.metadata.uid.clone().unwrap_or_default();
        let asked = annotate::<Pod>(&ctx.client, &ns, &name, &uid, (COMMIT_ANNOTATION, &request))
            .await
            .map_err(Error::Commit)?;
        if !asked {
            // Gone since the cache saw it: the next reconcile finds out.
            return Ok(requeue(1));
        }
        // Its change brings the next reconcile; this one is the fallback.
        return Ok(requeue(5));
    }
    let since = job
        .status
        .as_ref()
        .and_then(|s| s.completion_time.as_ref())
        .map_or(now.as_second(), |t| t.0.as_second());
    let limit = commit_limit(job, m);
    if now.as_second() - since > limit {
        let failure = Failure::new(
            FailureReason::ProgressDeadlineExceeded,
            format!(
                "hub pod {name} did not commit {} within {limit} s (spec.progressDeadlineSeconds, {} s, plus reading every disk back at {} MiB/s)",
                m.directory,
                job.spec.progress_deadline_seconds,
                READ_BACK_FLOOR >> 20
            ),
        );
        return Ok(finish::attempt_failed(job, ctx, failure, None).await?);
    }
    Ok(requeue(5))
}
