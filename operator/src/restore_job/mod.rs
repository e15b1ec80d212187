//! The RestoreJob controller: a restore point's disks onto claims, or files from its guest file
//! systems into a claim, by one pod that mounts the repository claim read-only. Its state lives
//! in the job's status and in its pod (deterministic name, labelled with the attempt), so a
//! restarted operator resumes where the last one stopped.
//!
//! Pending (`start`): the RestorePoint, its Repository and the selected disks are looked up;
//! for a `pvc` target every existing claim is checked to hold its disk before any claim is
//! created, then the missing claims are created (never owned by the job: its deletion keeps
//! the restored disks); for a `files` target the claim must exist (waited for up to the
//! progress deadline). Input that cannot work fails at once, with nothing written: no
//! retries. Running (`run`): the attempt's pod is created, its progress polled into status,
//! its result (the termination message) read; a failed attempt is retried up to
//! `spec.retryLimit`, unless the agent refused the input (then it fails at once: retrying
//! cannot help). Ended: the pod is removed.
//!
//! `outcome`: the reasons and conditions; `pending`: the start; `attempt`: one attempt's pod;
//! `finish`: an attempt's end.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use sendense_crds::RestoreJob;
use sendense_crds::backup_job::Phase;

use crate::children::{ApiError, delete_if_present};
use crate::metrics::Metrics;
use crate::resources::{PodSettings, restore_pod_name};
use crate::status::{StatusUpdate, now};

mod attempt;
mod finish;
mod lease;
mod outcome;
mod pending;

use attempt::*;
use finish::*;
use outcome::{Complete, Failed};
pub use outcome::{FailureReason, Running};
pub use pending::quantity_bytes;
use pending::*;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
    /// Every vCenter call's deadline (an in-place restore reads the vCenter's identity).
    pub vcenter_timeout: Duration,
    /// Where the VM Leases live (the operator's namespace).
    pub lease_namespace: String,
}

#[derive(Debug, thiserror::Error)]
#[error("RestoreJob {job}: {source}")]
pub struct Error {
    job: String,
    #[source]
    source: ApiError,
}

type Update<'a> = StatusUpdate<'a, RestoreJob>;

/// Human-readable bytes of a count kept as i64 in status.
fn human_bytes(n: i64) -> String {
    sendense_crds::common::human_bytes(n.max(0) as u64)
}

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

/// Seconds between two tries of a pod the API server refused.
const REFUSED_RETRY_SECONDS: u64 = 30;

/// Back-off before attempt `attempt` (2, 3, ...): 10 s, doubling, at most 5 minutes.
fn retry_backoff(attempt: i32) -> Duration {
    let exp = (attempt - 2).clamp(0, 5) as u32;
    Duration::from_secs((10u64 << exp).min(300))
}

/// The SourceNode a `vsphere` target restores through: its `sourceNodeRef`, else the one the
/// restore point was backed up through.
fn vsphere_source_node(
    target: &sendense_crds::restore_job::VsphereTarget,
    point: &sendense_crds::RestorePoint,
) -> String {
    target
        .source_node_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| point.spec.source_node_ref.name.clone())
}

fn target_kind(job: &RestoreJob) -> &'static str {
    if job.spec.target.files.is_some() {
        "files"
    } else if job.spec.target.vsphere.is_some() {
        "vsphere"
    } else {
        "pvc"
    }
}

impl Context {
    async fn write(&self, u: Update<'_>, job: &RestoreJob) -> Result<(), Error> {
        u.write(&self.client, &self.recorder)
            .await
            .map_err(|source| Error {
                job: job.name_any(),
                source,
            })
    }
}

fn api_err(job: &RestoreJob) -> impl Fn(ApiError) -> Error + '_ {
    move |source| Error {
        job: job.name_any(),
        source,
    }
}

pub async fn reconcile(job: Arc<RestoreJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("restorejob");
    let ns = job.namespace().unwrap_or_default();
    ctx.metrics.known_restores(&ns, target_kind(&job));
    match job.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Succeeded | Phase::Failed) => finished(&job, &ctx).await,
        Some(Phase::Running) => run(&job, &ctx).await,
        _ => start(&job, &ctx).await,
    }
}

pub fn error_policy(job: Arc<RestoreJob>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failed_reconcile("restorejob", &job.name_any(), err, "kube_api");
    requeue(10)
}

/// Ends the job as Failed with `reason`; `result` fills in what the agent reported.
async fn fail(
    job: &RestoreJob,
    ctx: &Context,
    mut u: Update<'_>,
    reason: FailureReason,
    message: String,
) -> Result<Action, Error> {
    u.status.phase = Some(Phase::Failed);
    u.status.completion_time = Some(now());
    u.set(&Running::Failed, message.clone());
    u.set(&Failed(reason), message);
    ctx.write(u, job).await?;
    let ns = job.namespace().unwrap_or_default();
    ctx.metrics
        .restores
        .with_label_values(&[&ns, target_kind(job), "failed"])
        .inc();
    Ok(requeue(1))
}

/// Ended: the pod goes (its result is in status); nothing else to do.
async fn finished(job: &RestoreJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    delete_if_present::<Pod>(&ctx.client, &ns, &restore_pod_name(job))
        .await
        .map_err(api_err(job))?;
    // The VM is free for its next backup once the pod that wrote it is going.
    lease::release(job, ctx).await?;
    Ok(Action::await_change())
}

/// The bytes of a quantity (`2Gi`, `500M`, `1e9`, `33554432`); None when it is not one.
#[cfg(test)]
mod tests {
    use super::*;
    use sendense_contract::restore::Refusal;

    #[test]
    fn quantities_read_as_bytes() {
        for (q, b) in [
            ("2Gi", Some(2 << 30)),
            ("33554432", Some(33554432)),
            ("16Mi", Some(16 << 20)),
            ("1G", Some(1_000_000_000)),
            ("1.5Ki", Some(1536)),
            ("1e3", Some(1000)),
            ("100m", Some(1)),
            ("x", None),
            ("12Qi", None),
            ("-1", None),
        ] {
            assert_eq!(quantity_bytes(q), b, "{q}");
        }
    }

    #[test]
    fn only_input_that_cannot_work_is_terminal() {
        for r in [
            Refusal::BadArguments,
            Refusal::SourceNotFound,
            Refusal::DiskNotFound,
            Refusal::TargetTooSmall,
            Refusal::TargetUnusable,
            Refusal::NothingMatched,
            Refusal::NoFileSystem,
            Refusal::Other,
        ] {
            assert!(FailureReason::of_refusal(r).terminal(), "{r:?}");
        }
        for r in [
            FailureReason::ProgressDeadlineExceeded,
            FailureReason::PodLost,
            FailureReason::RestoreFailed,
            FailureReason::ResultMissing,
        ] {
            assert!(!r.terminal(), "{r:?}");
        }
        assert_eq!(
            FailureReason::of_refusal(Refusal::TargetTooSmall).as_str(),
            "ClaimTooSmall"
        );
    }

    #[test]
    fn progress_is_a_percentage_of_the_disks() {
        assert_eq!(percent(0, 0), "0%");
        assert_eq!(percent(50, 200), "25%");
        assert_eq!(percent(300, 200), "100%");
        assert_eq!(percent(i64::MAX / 2, i64::MAX), "49%");
    }
}
