//! Running: the attempt's pod (created when missing, a pod of an earlier attempt removed
//! first), its progress into status, and its end handed to `finish`.

use super::*;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use sendense_crds::{Repository, RestoreJob, RestorePoint, SourceNode};

use crate::children::{applied, delete_if_present, get};
use crate::pod_state::{self, PodPhase};
use crate::resources::{
    ATTEMPT_LABEL, DiskToRestore, PROGRESS_PORT, PointDisks, claim_name, files_pod, restore_pod,
    restore_pod_name, restore_policy, vsphere_pod,
};
use crate::status::{holding, now};

/// Running: the attempt's pod, its progress and its end.
pub(super) async fn run(job: &RestoreJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let status = job.status.clone().unwrap_or_default();
    let attempt = status.attempts.unwrap_or(1);
    let name = restore_pod_name(job);
    let pod = get::<Pod>(&ctx.client, &ns, &name)
        .await
        .map_err(api_err(job))?;
    // A pod of another attempt goes first.
    if let Some(p) = &pod {
        let of_attempt = p
            .labels()
            .get(ATTEMPT_LABEL)
            .and_then(|a| a.parse::<i32>().ok());
        if of_attempt != Some(attempt) || pod_state::is_terminating(p) {
            if !pod_state::is_terminating(p) {
                delete_if_present::<Pod>(&ctx.client, &ns, &name)
                    .await
                    .map_err(api_err(job))?;
            } else if pod_state::kubelet_gone(p, Timestamp::now()) {
                crate::children::force_delete::<Pod>(&ctx.client, &ns, &name)
                    .await
                    .map_err(api_err(job))?;
            }
            return Ok(requeue(2));
        }
    }
    let Some(pod) = pod else {
        // A pod this attempt created and lost: the attempt fails.
        if status.attempt_start_time.is_some()
            && holding(&status.conditions, &Running::Retrying).is_none()
        {
            let message = format!("attempt {attempt}: pod {name} disappeared");
            return attempt_failed(job, ctx, FailureReason::PodLost, message, None).await;
        }
        if let Some(c) = holding(&status.conditions, &Running::Retrying) {
            let since =
                Timestamp::now().as_millisecond() - c.last_transition_time.0.as_millisecond();
            let left = retry_backoff(attempt).as_millis() as i64 - since;
            if left > 0 {
                return Ok(Action::requeue(Duration::from_millis(left as u64)));
            }
        }
        return create_pod(job, ctx, attempt).await;
    };
    let attempt_started = status
        .attempt_start_time
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_else(|| Timestamp::now().as_second());
    let waited = Timestamp::now().as_second() - attempt_started;
    match PodPhase::of(&pod) {
        PodPhase::Succeeded | PodPhase::Failed => ended(job, ctx, &pod, attempt).await,
        PodPhase::Running => {
            let mut u = Update::new(job);
            if let Some(ip) = pod_state::ip(&pod)
                && job.spec.target.files.is_none()
            {
                match crate::agent_progress::fetch(&format!("{ip}:{PROGRESS_PORT}")).await {
                    Ok(p) => {
                        let total = u.status.bytes_total.unwrap_or(0);
                        let done = i64::try_from(p.bytes_copied).unwrap_or(i64::MAX);
                        u.status.bytes_done = Some(done.min(total.max(done)));
                        u.status.progress = Some(percent(done, total));
                    }
                    Err(e) => tracing::debug!(job = %job.name_any(), "progress: {e}"),
                }
            }
            u.set(
                &Running::Restoring,
                format!("attempt {attempt}: pod {name} is restoring"),
            );
            ctx.write(u, job).await?;
            Ok(requeue(3))
        }
        PodPhase::Pending | PodPhase::Unknown => {
            let why = pod_state::unschedulable(&pod).or_else(|| pod_state::waiting_problem(&pod));
            if waited > job.spec.progress_deadline_seconds {
                let message = format!(
                    "attempt {attempt}: pod {name} did not start within spec.progressDeadlineSeconds ({} s){}",
                    job.spec.progress_deadline_seconds,
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                );
                return attempt_failed(
                    job,
                    ctx,
                    FailureReason::ProgressDeadlineExceeded,
                    message,
                    None,
                )
                .await;
            }
            let mut u = Update::new(job);
            match pod_state::unschedulable(&pod) {
                Some(why) => u.set(
                    &Running::PodUnschedulable,
                    format!("attempt {attempt}: pod {name} cannot be scheduled: {why}"),
                ),
                None => u.set(
                    &Running::Starting,
                    format!(
                        "attempt {attempt}: waiting for pod {name} to start{}",
                        pod_state::waiting_problem(&pod)
                            .map(|w| format!(" ({w})"))
                            .unwrap_or_default()
                    ),
                ),
            }
            ctx.write(u, job).await?;
            Ok(requeue(3))
        }
    }
}

pub(super) fn percent(done: i64, total: i64) -> String {
    if total <= 0 {
        return "0%".into();
    }
    format!("{}%", (done.clamp(0, total) as i128 * 100 / total as i128))
}

/// Creates the attempt's pod.
pub(super) async fn create_pod(
    job: &RestoreJob,
    ctx: &Context,
    attempt: i32,
) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let status = job.status.clone().unwrap_or_default();
    let rp_name = &job.spec.restore_point_ref.name;
    let u = Update::new(job);
    let Some(rp) = get::<RestorePoint>(&ctx.client, &ns, rp_name)
        .await
        .map_err(api_err(job))?
    else {
        let message = format!(
            "RestorePoint {rp_name} no longer exists in namespace {ns}; the restore stopped before attempt {attempt}"
        );
        return fail(job, ctx, u, FailureReason::RestorePointNotFound, message).await;
    };
    let repo_name = &rp.spec.repository_ref.name;
    let Some(repo) = get::<Repository>(&ctx.client, &ns, repo_name)
        .await
        .map_err(api_err(job))?
    else {
        let message = format!("Repository {repo_name} no longer exists in namespace {ns}");
        return fail(job, ctx, u, FailureReason::RepositoryNotFound, message).await;
    };
    let repo_claim = claim_name(&repo);
    if let Some(vs) = &job.spec.target.vsphere {
        let sn_name = vsphere_source_node(vs, &rp);
        let Some(sn) = get::<SourceNode>(&ctx.client, &ns, &sn_name)
            .await
            .map_err(api_err(job))?
        else {
            let message = format!(
                "SourceNode {sn_name} no longer exists in namespace {ns}; the restore stopped before attempt {attempt}"
            );
            return fail(job, ctx, u, FailureReason::SourceNodeNotFound, message).await;
        };
        let keys: Vec<i32> = status.disks.iter().map(|d| d.device_key).collect();
        let later = if vs.in_place.as_ref().is_none_or(|p| p.differential) && vs.new_vm.is_none() {
            later_files(ctx, &ns, &rp).await.map_err(api_err(job))?
        } else {
            Vec::new()
        };
        let what = PointDisks {
            point: &rp,
            disks: &keys,
            later: &later,
        };
        let pod = match vsphere_pod(job, attempt, &repo_claim, &what, &sn, &ctx.images) {
            Ok(p) => p,
            Err(e) => {
                let message = format!("SourceNode {sn_name}: {e}; nothing was written");
                return fail(job, ctx, u, FailureReason::NotAllowed, message).await;
            }
        };
        return create(job, ctx, attempt, pod, true).await;
    }
    let pod = match &job.spec.target.files {
        Some(files) => files_pod(
            job,
            attempt,
            &repo_claim,
            &rp.spec.directory,
            files,
            &ctx.images,
        ),
        None => {
            let disks: Vec<DiskToRestore> = status
                .disks
                .iter()
                .filter_map(|d| {
                    let rd = rp
                        .spec
                        .disks
                        .iter()
                        .find(|r| r.device_key == d.device_key)?;
                    Some(DiskToRestore {
                        key: d.device_key,
                        file: rd.file.clone(),
                        sha256: rd.sha256.clone(),
                        claim: d.claim_name.clone(),
                        mode: d.volume_mode.unwrap_or_default(),
                    })
                })
                .collect();
            restore_pod(job, attempt, &repo_claim, &disks, &ctx.images)
        }
    };
    create(job, ctx, attempt, pod, false).await
}

/// The files of the restore points made after `point` in its chain (its descendants), per
/// disk: the blocks they hold changed after the point.
async fn later_files(
    ctx: &Context,
    ns: &str,
    point: &RestorePoint,
) -> Result<Vec<(i32, String)>, crate::children::ApiError> {
    let all = crate::children::list::<RestorePoint>(&ctx.client, ns).await?;
    let parent_of: std::collections::BTreeMap<String, String> = all
        .iter()
        .filter_map(|r| Some((r.name_any(), r.spec.parent.as_ref()?.name.clone())))
        .collect();
    let target = point.name_any();
    let descends = |name: &str| {
        let mut at = name.to_owned();
        // A chain is a tree without cycles; the bound guards against a corrupted one.
        for _ in 0..=all.len() {
            match parent_of.get(&at) {
                Some(p) if *p == target => return true,
                Some(p) => at = p.clone(),
                None => return false,
            }
        }
        false
    };
    Ok(all
        .iter()
        .filter(|r| r.spec.vm.instance_uuid == point.spec.vm.instance_uuid)
        .filter(|r| descends(&r.name_any()))
        .flat_map(|r| r.spec.disks.iter().map(|d| (d.device_key, d.file.clone())))
        .collect())
}

/// Creates the attempt's pod (and its NetworkPolicy); `egress`: it talks to vCenter.
async fn create(
    job: &RestoreJob,
    ctx: &Context,
    attempt: i32,
    pod: Pod,
    egress: bool,
) -> Result<Action, Error> {
    // A reconcile on a cached copy older than the last status write creates nothing.
    if !crate::children::is_current(&ctx.client, job)
        .await
        .map_err(api_err(job))?
    {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let ns = job.namespace().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone());
    let created = async {
        crate::children::ensure_service_account(&ctx.client, &ns, account.as_deref()).await?;
        if let Some(operator) = &ctx.images.network_policy {
            crate::children::apply(&ctx.client, &ns, &restore_policy(job, operator, egress))
                .await?;
        }
        applied(&ctx.client, &ns, &pod).await
    }
    .await;
    let mut u = Update::new(job);
    match created {
        Ok(_) => {
            u.status.attempt_start_time = Some(now());
            u.set(
                &Running::Starting,
                format!("attempt {attempt}: pod {} created", restore_pod_name(job)),
            );
            ctx.write(u, job).await?;
            Ok(requeue(2))
        }
        Err(e) => match e.refusal() {
            Some(why) => {
                let message = format!(
                    "attempt {attempt}: the API server refused pod {}: {why}",
                    restore_pod_name(job)
                );
                u.set(&Running::PodRejected, message);
                ctx.write(u, job).await?;
                Ok(requeue(REFUSED_RETRY_SECONDS))
            }
            None => Err(api_err(job)(e)),
        },
    }
}
