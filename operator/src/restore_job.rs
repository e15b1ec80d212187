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

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Client, ResourceExt};
use sendense_contract::restore::{FilesResult, Refusal, RestoreResult};
use sendense_crds::backup_job::Phase;

use sendense_crds::restore_job::{RestoredDiskStatus, RestoredFilesStatus, VolumeMode};
use sendense_crds::{Repository, RestoreJob, RestorePoint};

use crate::children::{ApiError, applied, create_if_missing, delete_if_present, get};
use crate::metrics::Metrics;
use crate::pod_state::{self, PodPhase};
use crate::resources::{
    ATTEMPT_LABEL, DiskToRestore, NewClaim, PROGRESS_PORT, PodSettings, block_claim_bytes,
    claim_name, default_claim_name, files_directory, files_pod, filesystem_claim_bytes,
    kubevirt_vm, restore_claim, restore_pod, restore_pod_name, restore_policy,
};
use crate::status::{ConditionReason, StatusUpdate, holding, now};

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
}

#[derive(Debug, thiserror::Error)]
#[error("RestoreJob {job}: {source}")]
pub struct Error {
    job: String,
    #[source]
    source: ApiError,
}

type Update<'a> = StatusUpdate<'a, RestoreJob>;

/// Why a restore failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    RestorePointNotFound,
    RepositoryNotFound,
    DiskNotFound,
    ClaimNotFound,
    ClaimTooSmall,
    /// A claim is of the wrong kind for its disk (the agent found no directory, a file where
    /// the image goes, ...).
    ClaimUnusable,
    NothingMatched,
    NoFileSystem,
    /// The restore point's files are missing or unreadable on the repository volume.
    RestorePointUnreadable,
    /// The pod's command line was refused (a bug or an agent of another version).
    InvalidRequest,
    /// The attempt's pod did not start within the progress deadline.
    ProgressDeadlineExceeded,
    /// The attempt's pod was deleted or lost with its node.
    PodLost,
    /// The restore ran and failed (an I/O error, a read-back that did not match, ...).
    RestoreFailed,
    /// The pod ended without a readable result.
    ResultMissing,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestorePointNotFound => "RestorePointNotFound",
            Self::RepositoryNotFound => "RepositoryNotFound",
            Self::DiskNotFound => "DiskNotFound",
            Self::ClaimNotFound => "ClaimNotFound",
            Self::ClaimTooSmall => "ClaimTooSmall",
            Self::ClaimUnusable => "ClaimUnusable",
            Self::NothingMatched => "NothingMatched",
            Self::NoFileSystem => "NoFileSystem",
            Self::RestorePointUnreadable => "RestorePointUnreadable",
            Self::InvalidRequest => "InvalidRequest",
            Self::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Self::PodLost => "PodLost",
            Self::RestoreFailed => "RestoreFailed",
            Self::ResultMissing => "ResultMissing",
        }
    }

    /// Input that cannot work as given: the job fails at once, without retries.
    pub fn terminal(self) -> bool {
        !matches!(
            self,
            Self::ProgressDeadlineExceeded
                | Self::PodLost
                | Self::RestoreFailed
                | Self::ResultMissing
        )
    }

    /// The reason of an agent's refusal.
    pub fn of_refusal(r: Refusal) -> Self {
        match r {
            Refusal::BadArguments | Refusal::Other => Self::InvalidRequest,
            Refusal::SourceNotFound => Self::RestorePointUnreadable,
            Refusal::DiskNotFound => Self::DiskNotFound,
            Refusal::TargetTooSmall => Self::ClaimTooSmall,
            Refusal::TargetUnusable => Self::ClaimUnusable,
            Refusal::NothingMatched => Self::NothingMatched,
            Refusal::NoFileSystem => Self::NoFileSystem,
        }
    }
}

/// The `Running` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// The pod is created and starting.
    Starting,
    Restoring,
    /// Waiting for a claim to exist.
    ClaimNotFound,
    /// The API server refused the pod (quota, admission).
    PodRejected,
    PodUnschedulable,
    Retrying,
    Completed,
    Failed,
}

impl ConditionReason for Running {
    fn condition_type(&self) -> &'static str {
        "Running"
    }
    fn is_true(&self) -> bool {
        matches!(self, Self::Starting | Self::Restoring)
    }
    fn reason(&self) -> &str {
        match self {
            Self::Starting => "Starting",
            Self::Restoring => "Restoring",
            Self::ClaimNotFound => "ClaimNotFound",
            Self::PodRejected => "PodRejected",
            Self::PodUnschedulable => "PodUnschedulable",
            Self::Retrying => "Retrying",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        match self {
            Self::Starting | Self::Restoring => Some(EventType::Normal),
            Self::ClaimNotFound | Self::PodRejected | Self::PodUnschedulable | Self::Retrying => {
                Some(EventType::Warning)
            }
            Self::Completed | Self::Failed => None,
        }
    }
}

/// The `Complete` condition.
struct Complete;

impl ConditionReason for Complete {
    fn condition_type(&self) -> &'static str {
        "Complete"
    }
    fn is_true(&self) -> bool {
        true
    }
    fn reason(&self) -> &str {
        "RestoreSucceeded"
    }
    fn event_type(&self) -> Option<EventType> {
        Some(EventType::Normal)
    }
}

/// The `Failed` condition.
struct Failed(FailureReason);

impl ConditionReason for Failed {
    fn condition_type(&self) -> &'static str {
        "Failed"
    }
    fn is_true(&self) -> bool {
        true
    }
    fn reason(&self) -> &str {
        self.0.as_str()
    }
    fn event_type(&self) -> Option<EventType> {
        Some(EventType::Warning)
    }
}

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

fn target_kind(job: &RestoreJob) -> &'static str {
    if job.spec.target.files.is_some() {
        "files"
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
    Ok(Action::await_change())
}

/// The bytes of a quantity (`2Gi`, `500M`, `1e9`, `33554432`); None when it is not one.
pub fn quantity_bytes(q: &str) -> Option<i64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = (value * mult).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64).then_some(bytes as i64)
}

/// A claim's size: its capacity once bound, else what it asks for.
fn claim_bytes(c: &PersistentVolumeClaim) -> Option<i64> {
    let from = |m: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >| {
        m.and_then(|m| m.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
    };
    from(c.status.as_ref().and_then(|s| s.capacity.as_ref())).or_else(|| {
        from(
            c.spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref()),
        )
    })
}

fn claim_mode(c: &PersistentVolumeClaim) -> VolumeMode {
    match c.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) {
        Some("Block") => VolumeMode::Block,
        _ => VolumeMode::Filesystem,
    }
}

/// Pending: the references, the claims, and the plan into status.
async fn start(job: &RestoreJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let mut u = Update::new(job);
    if u.status.start_time.is_none() {
        u.status.start_time = Some(now());
    }
    u.status.target_kind = Some(if job.spec.target.files.is_some() {
        "Files".into()
    } else {
        "Pvc".into()
    });
    let rp_name = &job.spec.restore_point_ref.name;
    let Some(rp) = get::<RestorePoint>(&ctx.client, &ns, rp_name)
        .await
        .map_err(api_err(job))?
    else {
        let message = format!(
            "RestorePoint {rp_name} does not exist in namespace {ns} (`kubectl get restorepoints -n {ns}` lists them); nothing was written"
        );
        return fail(job, ctx, u, FailureReason::RestorePointNotFound, message).await;
    };
    u.status.vm_name = Some(rp.spec.vm.name.clone());
    let repo_name = &rp.spec.repository_ref.name;
    u.status.repository = Some(repo_name.clone());
    if get::<Repository>(&ctx.client, &ns, repo_name)
        .await
        .map_err(api_err(job))?
        .is_none()
    {
        let message = format!(
            "Repository {repo_name}, which holds RestorePoint {rp_name}, does not exist in namespace {ns}; nothing was written"
        );
        return fail(job, ctx, u, FailureReason::RepositoryNotFound, message).await;
    }
    let have: Vec<i32> = rp.spec.disks.iter().map(|d| d.device_key).collect();
    let keys: Vec<i32> = match &job.spec.disks {
        Some(keys) => keys.clone(),
        None => have.clone(),
    };
    if let Some(k) = keys.iter().find(|k| !have.contains(k)) {
        let message = format!(
            "spec.disks: RestorePoint {rp_name} has no disk {k} (its disks: {have:?}); nothing was written"
        );
        return fail(job, ctx, u, FailureReason::DiskNotFound, message).await;
    }
    if let Some(pvc) = &job.spec.target.pvc
        && let Some(c) = pvc.claims.iter().find(|c| !keys.contains(&c.device_key))
    {
        let message = format!(
            "spec.target.pvc.claims: disk {} is not restored (restored: {keys:?}); nothing was written",
            c.device_key
        );
        return fail(job, ctx, u, FailureReason::DiskNotFound, message).await;
    }

    if let Some(files) = &job.spec.target.files {
        let claim = &files.claim_name;
        if get::<PersistentVolumeClaim>(&ctx.client, &ns, claim)
            .await
            .map_err(api_err(job))?
            .is_none()
        {
            let waited = job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| Timestamp::now().as_second() - t.0.as_second())
                .unwrap_or_default();
            let message = format!(
                "spec.target.files.claimName: PersistentVolumeClaim {claim} does not exist in namespace {ns}; create it (the files are written to it)"
            );
            if waited > job.spec.progress_deadline_seconds {
                let message = format!(
                    "{message}; waited {waited} s (spec.progressDeadlineSeconds {}); nothing was written",
                    job.spec.progress_deadline_seconds
                );
                return fail(job, ctx, u, FailureReason::ClaimNotFound, message).await;
            }
            u.set(&Running::ClaimNotFound, message);
            ctx.write(u, job).await?;
            return Ok(requeue(5));
        }
        u.status.bytes_total = None;
        return started(job, ctx, u).await;
    }

    // A pvc target: every existing claim is checked before any claim is created.
    let pvc = job.spec.target.pvc.clone().unwrap_or_else(|| {
        // The CRD's CEL rule requires exactly one target; an object admitted before that rule
        // (or without it) is read as a pvc target with defaults.
        sendense_crds::restore_job::PvcTarget {
            claims: Vec::new(),
            storage_class_name: None,
            volume_mode: VolumeMode::Filesystem,
            access_mode: Default::default(),
            kube_virt: None,
        }
    });
    let mut planned = Vec::new();
    let mut missing = Vec::new();
    for key in &keys {
        let disk = rp
            .spec
            .disks
            .iter()
            .find(|d| d.device_key == *key)
            .expect("checked above");
        let name = pvc
            .claims
            .iter()
            .find(|c| c.device_key == *key)
            .map(|c| c.claim_name.clone())
            .unwrap_or_else(|| default_claim_name(job, *key));
        let existing = get::<PersistentVolumeClaim>(&ctx.client, &ns, &name)
            .await
            .map_err(api_err(job))?;
        let created_by_us = existing.as_ref().is_some_and(|c| {
            c.labels().get(crate::resources::RESTORE_JOB_LABEL) == Some(&job.name_any())
        });
        match existing {
            Some(c) => {
                let mode = claim_mode(&c);
                let size = claim_bytes(&c).unwrap_or(0);
                let need = match mode {
                    VolumeMode::Filesystem => disk.capacity_bytes,
                    VolumeMode::Block => disk.capacity_bytes,
                };
                if size < need {
                    let message = format!(
                        "PersistentVolumeClaim {name} holds {} ({size} bytes); disk {key} needs {} ({need} bytes){}: give a larger claim in spec.target.pvc.claims, or leave the disk out of it and Sendense creates one; nothing was written",
                        human_bytes(size),
                        human_bytes(need),
                        if mode == VolumeMode::Filesystem {
                            " as disk.img, plus the file system's own overhead"
                        } else {
                            ""
                        }
                    );
                    return fail(job, ctx, u, FailureReason::ClaimTooSmall, message).await;
                }
                planned.push(RestoredDiskStatus {
                    device_key: *key,
                    claim_name: name,
                    volume_mode: mode,
                    created: created_by_us,
                    capacity_bytes: disk.capacity_bytes,
                    ..Default::default()
                });
            }
            None => {
                let bytes = match pvc.volume_mode {
                    VolumeMode::Filesystem => filesystem_claim_bytes(disk.capacity_bytes),
                    VolumeMode::Block => block_claim_bytes(disk.capacity_bytes),
                };
                missing.push((
                    *key,
                    NewClaim {
                        name: name.clone(),
                        bytes,
                        mode: pvc.volume_mode,
                        access: pvc.access_mode,
                        storage_class: pvc.storage_class_name.clone(),
                    },
                ));
                planned.push(RestoredDiskStatus {
                    device_key: *key,
                    claim_name: name,
                    volume_mode: pvc.volume_mode,
                    created: true,
                    capacity_bytes: disk.capacity_bytes,
                    ..Default::default()
                });
            }
        }
    }
    for (key, c) in &missing {
        let claim = restore_claim(job, *key, c);
        if let Err(e) = create_if_missing(&ctx.client, &ns, &claim).await {
            if let Some(why) = e.refusal() {
                let message = format!(
                    "the API server refused PersistentVolumeClaim {}: {why}",
                    c.name
                );
                u.set(&Running::PodRejected, message);
                ctx.write(u, job).await?;
                return Ok(requeue(REFUSED_RETRY_SECONDS));
            }
            return Err(api_err(job)(e));
        }
    }
    u.status.bytes_total = Some(planned.iter().map(|d| d.capacity_bytes).sum());
    u.status.bytes_done = Some(0);
    u.status.progress = Some("0%".into());
    u.status.disks = planned;
    started(job, ctx, u).await
}

async fn started(job: &RestoreJob, ctx: &Context, mut u: Update<'_>) -> Result<Action, Error> {
    u.status.phase = Some(Phase::Running);
    u.status.attempts = Some(1);
    u.set(
        &Running::Starting,
        format!(
            "restoring RestorePoint {} ({})",
            job.spec.restore_point_ref.name,
            match &job.spec.target.files {
                Some(f) => format!("files into PersistentVolumeClaim {}", f.claim_name),
                None => {
                    let claims: Vec<String> = u
                        .status
                        .disks
                        .iter()
                        .map(|d| format!("disk {} -> {}", d.device_key, d.claim_name))
                        .collect();
                    claims.join(", ")
                }
            }
        ),
    );
    ctx.write(u, job).await?;
    Ok(requeue(1))
}

/// Running: the attempt's pod, its progress and its end.
async fn run(job: &RestoreJob, ctx: &Context) -> Result<Action, Error> {
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
                && job.spec.target.pvc.is_some()
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

fn percent(done: i64, total: i64) -> String {
    if total <= 0 {
        return "0%".into();
    }
    format!("{}%", (done.clamp(0, total) as i128 * 100 / total as i128))
}

/// Creates the attempt's pod.
async fn create_pod(job: &RestoreJob, ctx: &Context, attempt: i32) -> Result<Action, Error> {
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
                        mode: d.volume_mode,
                    })
                })
                .collect();
            restore_pod(job, attempt, &repo_claim, &disks, &ctx.images)
        }
    };
    let account = ctx.images.hub_service_account.as_deref();
    let created = async {
        crate::children::ensure_service_account(&ctx.client, &ns, account).await?;
        if let Some(operator) = &ctx.images.network_policy {
            crate::children::apply(&ctx.client, &ns, &restore_policy(job, operator)).await?;
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

/// What the pod's result says, in status.
enum Outcome {
    Restored(RestoreResult),
    Files(FilesResult),
}

/// The pod ended: its result into status; success, a retry, or the end.
async fn ended(job: &RestoreJob, ctx: &Context, pod: &Pod, attempt: i32) -> Result<Action, Error> {
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
fn record(u: &mut Update<'_>, job: &RestoreJob, outcome: &Outcome) {
    match outcome {
        Outcome::Restored(r) => {
            for d in &r.disks {
                if let Some(s) = u.status.disks.iter_mut().find(|s| s.device_key == d.key) {
                    s.bytes_written = Some(d.bytes_written as i64);
                    s.bytes_zeroed = Some(d.bytes_zeroed as i64);
                    s.bytes_skipped = Some(d.bytes_skipped as i64);
                    s.sha256 = d.sha256.clone();
                    s.verified = d.verified;
                }
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

async fn succeeded(job: &RestoreJob, ctx: &Context, outcome: &Outcome) -> Result<Action, Error> {
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
                    format!(
                        "disk {} onto {}: {} written, verified {}",
                        d.key,
                        u.status
                            .disks
                            .iter()
                            .find(|s| s.device_key == d.key)
                            .map(|s| s.claim_name.as_str())
                            .unwrap_or("?"),
                        human_bytes(d.bytes_written as i64),
                        if d.verified == Some(true) {
                            "against the restore point's SHA-256"
                        } else {
                            "no"
                        }
                    )
                })
                .collect();
            format!("restored in {:.0} s: {}", r.seconds, disks.join("; "))
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
async fn attempt_failed(
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

#[cfg(test)]
mod tests {
    use super::*;

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
