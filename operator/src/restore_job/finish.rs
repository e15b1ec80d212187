//! The end of an attempt: the pod's result into status; success, a retry after a back-off, or
//! the job Failed.

use super::*;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use sendense_contract::restore::{FilesResult, RestoreResult};
use sendense_crds::RestoreJob;
use sendense_crds::backup_job::Phase;
use sendense_crds::restore_job::RestoredFilesStatus;

use crate::children::delete_if_present;
use crate::pod_state;
use crate::resources::{files_directory, kubevirt_vm, restore_pod_name};
use crate::status::now;

/// What the pod's result says, in status.
pub(super) enum Outcome {
    Restored(RestoreResult),
    Files(FilesResult),
}

/// The pod ended: its result into status; success, a retry, or the end.
pub(super) async fn ended(
    job: &RestoreJob,
    ctx: &Context,
    pod: &Pod,
    attempt: i32,
) -> Result<Action, Error> {
    let message = pod_state::termination_message(pod).unwrap_or_default();
    let outcome = if job.spec.target.files.is_some() {
        FilesResult::parse(&message).map(Outcome::Files)
    } else {
        RestoreResult::parse(&message).map(Outcome::Restored)
    };
    let Some(outcome) = outcome else {
        let why = pod_state::failure(pod).unwrap_or_else(|| format!("{message:.300}"));
        let message = format!(
            "attempt {attempt}: pod {} ended without a readable result: {why}",
            pod.name_any()
        );
        return attempt_failed(job, ctx, FailureReason::ResultMissing, message, None).await;
    };
    let (ok, error, refused) = match &outcome {
        Outcome::Restored(r) => (
            r.ok,
            r.error.clone(),
            r.refused.filter(|_| r.nothing_written),
        ),
        Outcome::Files(r) => (
            r.ok,
            r.error.clone(),
            r.refused.filter(|_| r.nothing_written),
        ),
    };
    if ok {
        return succeeded(job, ctx, &outcome).await;
    }
    let error = error.unwrap_or_else(|| "the restore failed".into());
    match refused {
        Some(r) => {
            let mut u = Update::new(job);
            record(&mut u, job, &outcome);
            let message = format!("{error}; nothing was written");
            fail(job, ctx, u, FailureReason::of_refusal(r), message).await
        }
        None => {
            let message = format!("attempt {attempt}: {error}");
            attempt_failed(
                job,
                ctx,
                FailureReason::RestoreFailed,
                message,
                Some(&outcome),
            )
            .await
        }
    }
}

/// What the agent reported, into status.
pub(super) fn record(u: &mut Update<'_>, job: &RestoreJob, outcome: &Outcome) {
    match outcome {
        Outcome::Restored(r) => {
            for d in &r.disks {
                if let Some(s) = u.status.disks.iter_mut().find(|s| s.device_key == d.key) {
                    s.bytes_written = Some(d.bytes_written as i64);
                    s.bytes_zeroed = Some(d.bytes_zeroed as i64);
                    s.bytes_skipped = Some(d.bytes_skipped as i64);
                    s.sha256 = d.sha256.clone();
                    s.verified = d.verified;
                    s.bytes_verified = d.bytes_verified.map(|b| b as i64);
                    if d.file.is_some() {
                        s.file = d.file.clone();
                    }
                    s.differential = d.differential;
                    s.full_reason = d.full_reason.clone();
                }
            }
            if let Some(vm) = &r.vm {
                u.status.vm = Some(sendense_crds::restore_job::RestoredVmStatus {
                    name: vm.name.clone(),
                    moref: vm.moref.clone(),
                    instance_uuid: vm.instance_uuid.clone(),
                    created: vm.created,
                    cbt_reset: vm.cbt_reset,
                });
            }
            let written: i64 = r.disks.iter().map(|d| d.bytes_written as i64).sum();
            u.status.bytes_written = Some(written);
            u.status.written = Some(human_bytes(written));
        }
        Outcome::Files(r) => {
            let target = job.spec.target.files.as_ref();
            let path = target
                .map(|t| {
                    let dir = files_directory(job, t);
                    match t.format {
                        sendense_crds::restore_job::FilesFormat::Tar => format!("{dir}.tar"),
                        sendense_crds::restore_job::FilesFormat::Directory => format!("{dir}/"),
                    }
                })
                .unwrap_or_default();
            u.status.files = Some(RestoredFilesStatus {
                path,
                files: r.files as i64,
                directories: r.directories as i64,
                symlinks: r.symlinks as i64,
                bytes: r.bytes as i64,
                ownership_not_set: r.ownership_not_set as i64,
                failed: r.failed as i64,
                failures: r.failures.clone(),
            });
            u.status.bytes_written = Some(r.bytes as i64);
            u.status.written = Some(human_bytes(r.bytes as i64));
        }
    }
}

pub(super) async fn succeeded(
    job: &RestoreJob,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let mut u = Update::new(job);
    record(&mut u, job, outcome);
    u.status.phase = Some(Phase::Succeeded);
    u.status.completion_time = Some(now());
    if let Some(total) = u.status.bytes_total {
        u.status.bytes_done = Some(total);
    }
    u.status.progress = Some("100%".into());
    if let Some(kv) = job
        .spec
        .target
        .pvc
        .as_ref()
        .and_then(|p| p.kube_virt.as_ref())
    {
        let claims: Vec<(i32, String)> = u
            .status
            .disks
            .iter()
            .map(|d| (d.device_key, d.claim_name.clone()))
            .collect();
        let name = kv.name.clone().unwrap_or_else(|| job.name_any());
        u.status.virtual_machine = Some(kubevirt_vm(job, &name, &kv.memory, kv.cpus, &claims));
    }
    let message = match outcome {
        Outcome::Restored(r) => {
            let disks: Vec<String> = r
                .disks
                .iter()
                .map(|d| {
                    let onto = match &d.file {
                        Some(f) => f.clone(),
                        None => u
                            .status
                            .disks
                            .iter()
                            .find(|s| s.device_key == d.key)
                            .map(|s| s.claim_name.clone())
                            .unwrap_or_else(|| "?".into()),
                    };
                    let how = match (d.differential, &d.full_reason) {
                        (Some(true), _) => format!(
                            "only the blocks changed since the restore point ({} of {})",
                            human_bytes(d.bytes_total as i64),
                            human_bytes(d.capacity as i64)
                        ),
                        (Some(false), Some(why)) => format!("the whole disk ({why})"),
                        _ => "the whole disk".into(),
                    };
                    let verified = match (d.verified, d.bytes_verified) {
                        (Some(true), _) => "verified against the restore point's SHA-256".into(),
                        (_, Some(n)) => format!("{} read back as written", human_bytes(n as i64)),
                        _ => "not verified".to_owned(),
                    };
                    format!(
                        "disk {} onto {onto}: {how}, {} written, {verified}",
                        d.key,
                        human_bytes(d.bytes_written as i64),
                    )
                })
                .collect();
            let vm = match &r.vm {
                Some(vm) if vm.created => format!(" into the new VM {} ({})", vm.name, vm.moref),
                Some(vm) => format!(
                    " into VM {} in place{}",
                    vm.name,
                    if vm.cbt_reset {
                        "; its CBT was reset, so its next backup is a full one"
                    } else {
                        ""
                    }
                ),
                None => String::new(),
            };
            format!("restored in {:.0} s{vm}: {}", r.seconds, disks.join("; "))
        }
        Outcome::Files(r) => format!(
            "restored {} files, {} directories, {} symlinks ({}) into {}",
            r.files,
            r.directories,
            r.symlinks,
            human_bytes(r.bytes as i64),
            u.status
                .files
                .as_ref()
                .map(|f| f.path.as_str())
                .unwrap_or("")
        ),
    };
    u.set(&Running::Completed, message.clone());
    u.set(&Complete, message);
    let written = u.status.bytes_written.unwrap_or(0);
    ctx.write(u, job).await?;
    ctx.metrics
        .restores
        .with_label_values(&[&ns, target_kind(job), "succeeded"])
        .inc();
    ctx.metrics
        .restore_bytes_written
        .with_label_values(&[&ns])
        .inc_by(written.max(0) as u64);
    Ok(requeue(1))
}

/// A failed attempt: retried after a back-off, or the job fails when it was the last.
pub(super) async fn attempt_failed(
    job: &RestoreJob,
    ctx: &Context,
    reason: FailureReason,
    message: String,
    outcome: Option<&Outcome>,
) -> Result<Action, Error> {
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    let mut u = Update::new(job);
    if let Some(o) = outcome {
        record(&mut u, job, o);
    }
    if reason.terminal() || attempt > job.spec.retry_limit {
        let message = if reason.terminal() {
            message
        } else {
            format!(
                "{message} (attempt {attempt} of {}; spec.retryLimit {})",
                job.spec.retry_limit + 1,
                job.spec.retry_limit
            )
        };
        return fail(job, ctx, u, reason, message).await;
    }
    let ns = job.namespace().unwrap_or_default();
    delete_if_present::<Pod>(&ctx.client, &ns, &restore_pod_name(job))
        .await
        .map_err(api_err(job))?;
    u.status.attempts = Some(attempt + 1);
    u.status.attempt_start_time = None;
    let backoff = retry_backoff(attempt + 1);
    u.set(
        &Running::Retrying,
        format!(
            "{message}; attempt {} starts in {} s",
            attempt + 1,
            backoff.as_secs()
        ),
    );
    ctx.write(u, job).await?;
    Ok(Action::requeue(backoff))
}
