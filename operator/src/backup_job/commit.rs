//! The last step of a successful attempt: its copied files become a restore point. The hub and
//! agent go first (qemu-nbd closes the images); a short pod then runs `repo commit`, which reads
//! each disk back through its chain and writes the manifest next to the files; the RestorePoint
//! object is made from that manifest; then the job is Succeeded. A failed commit fails the
//! attempt like any other failure: the next attempt copies afresh into its own directory.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use sendense_contract::manifest::{CommitResult, Manifest};
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};

use super::context::Context;
use super::finish;
use super::outcome::{Failure, FailureReason, JobPod, Running};
use super::run::{Error, attempt_of, for_attempt, read_pod, refused, stale};
use super::status::{self, JobUpdate};
use crate::children::{apply, create_if_missing, delete_if_present, force_delete, get};
use crate::pod_state::{self, PodPhase};
use crate::resources::{agent_name, claim_name, commit_name, commit_pod, hub_name};
use crate::restore_point::{from_manifest, manifest};

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

async fn fail(job: &BackupJob, ctx: &Context, message: String) -> Result<Action, Error> {
    let failure = Failure::new(FailureReason::CommitFailed, message);
    Ok(finish::attempt_failed(job, ctx, failure, None).await?)
}

/// Commits the copied attempt.
pub async fn commit(job: &BackupJob, ctx: &Context, attempt: i32) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    // The attempt's hub and agent are gone: nothing writes the files any more.
    for name in [hub_name(job), agent_name(job)] {
        // From the cache; its word that the pod is gone is checked once with the API server.
        let pod = match ctx.caches.absent(&ns, &name) {
            Some(true) if !ctx.caches.first(job, &format!("{attempt}/{name}/gone")) => None,
            _ => read_pod(ctx, &ns, &name).await?,
        };
        if let Some(p) = pod {
            if !pod_state::is_terminating(&p) {
                delete_if_present::<Pod>(&ctx.client, &ns, &name)
                    .await
                    .map_err(Error::StalePods)?;
            } else if pod_state::kubelet_gone(&p, Timestamp::now()) {
                // Its node no longer answers; its qemu-nbd, if it still runs out there, holds
                // files this commit only reads.
                force_delete::<Pod>(&ctx.client, &ns, &name)
                    .await
                    .map_err(Error::StalePods)?;
            }
            return Ok(requeue(2));
        }
    }
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
    let name = commit_name(job);
    let pod = read_pod(ctx, &ns, &name).await?;
    let Some(pod) = pod else {
        if stale(job, ctx).await? {
            return Ok(requeue(1));
        }
        let repo_name = &job.spec.repository_ref.name;
        // Only its claim's name is needed: from the cache when it holds the Repository.
        let key = kube::runtime::reflector::ObjectRef::new(repo_name).within(&ns);
        let repo = match ctx.caches.repositories.get(&key) {
            Some(r) => Some(r.as_ref().clone()),
            None => get::<Repository>(&ctx.client, &ns, repo_name)
                .await
                .map_err(Error::Pods)?,
        };
        let Some(repo) = repo else {
            return Ok(finish::attempt_failed(
                job,
                ctx,
                Failure::new(
                    FailureReason::RepositoryNotFound,
                    format!("Repository {repo_name} no longer exists"),
                ),
                None,
            )
            .await?);
        };
        let pod = commit_pod(job, &claim_name(&repo), &m, &ctx.images);
        let account = ctx.images.hub_service_account.as_deref();
        let created = async {
            ctx.ensure_account(&ns, account).await?;
            apply(&ctx.client, &ns, &for_attempt(pod, attempt)).await
        }
        .await;
        if let Err(e) = created {
            return refused::<()>(job, ctx, attempt, JobPod::Commit, e, Error::Hub)
                .await
                .map(|flow| flow.break_value().unwrap_or_else(|| requeue(30)));
        }
        let mut u = JobUpdate::new(job);
        u.set(&Running::Committing, reading_back(attempt, &m));
        status::write(u, ctx).await.map_err(Error::Status)?;
        return Ok(requeue(3));
    };
    if attempt_of(&pod) != Some(attempt) || pod_state::is_terminating(&pod) {
        if !pod_state::is_terminating(&pod) {
            delete_if_present::<Pod>(&ctx.client, &ns, &name)
                .await
                .map_err(Error::StalePods)?;
        }
        return Ok(requeue(2));
    }
    let result = || CommitResult::parse(&pod_state::termination_message(&pod).unwrap_or_default());
    match PodPhase::of(&pod) {
        PodPhase::Succeeded => {
            let Some(r) = result().filter(|r| r.ok) else {
                return fail(
                    job,
                    ctx,
                    "the commit ended without a readable result".into(),
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
                .or_else(|| pod_state::failure(&pod))
                .unwrap_or_else(|| "the commit pod failed".into());
            fail(job, ctx, format!("committing {}: {why}", m.directory)).await
        }
        PodPhase::Pending => {
            // A commit pod that does not start within spec.progressDeadlineSeconds fails the
            // attempt; one that cannot be scheduled says so meanwhile.
            let age = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| Timestamp::now().as_second() - t.0.as_second());
            let limit = job.spec.progress_deadline_seconds;
            let why = pod_state::unschedulable(&pod)
                .map(|w| format!("it cannot be scheduled: {w}"))
                .or_else(|| pod_state::waiting_problem(&pod));
            if age >= limit {
                let failure = Failure::new(
                    FailureReason::ProgressDeadlineExceeded,
                    format!(
                        "commit pod {name} did not start within spec.progressDeadlineSeconds ({limit} s){}",
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    ),
                );
                return Ok(finish::attempt_failed(job, ctx, failure, None).await?);
            }
            if let Some(w) = pod_state::unschedulable(&pod) {
                let mut u = JobUpdate::new(job);
                u.set(
                    &Running::Unschedulable(JobPod::Commit),
                    format!("attempt {attempt}: commit pod {name} cannot be scheduled: {w}"),
                );
                status::write(u, ctx).await.map_err(Error::Status)?;
            }
            Ok(requeue(3))
        }
        _ => {
            let mut u = JobUpdate::new(job);
            u.set(&Running::Committing, reading_back(attempt, &m));
            status::write(u, ctx).await.map_err(Error::Status)?;
            Ok(requeue(3))
        }
    }
}

fn reading_back(attempt: i32, m: &Manifest) -> String {
    format!(
        "attempt {attempt}: reading the files back and writing the manifest {}",
        m.path()
    )
}
