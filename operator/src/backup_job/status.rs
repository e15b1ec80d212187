//! The job's status transitions, pure over a `StatusUpdate`: waiting, started with its plan,
//! progress, success, a failed attempt (retry or the end). Reading the recorded plan back as
//! the hub's and agent's inputs is in `pod_inputs`.

use sendense_contract::progress::{ProgressReport, Stage};
use sendense_contract::result::{self, BackupResult, SnapshotReport};
use sendense_crds::BackupJob;
use sendense_crds::backup_job::{AttemptPod, CopyKind, Phase, SnapshotStatus};
use sendense_crds::common::human_bytes;

use k8s_openapi::jiff::Timestamp;

use super::outcome::{
    Complete, Failed, Failure, FailureClass, FailureReason, FilesRemoved, JobPod, Running,
    SnapshotRemoved, Wait, retry_backoff,
};
use super::plan::Plan;
pub use super::pod_inputs::{base_change_ids, hub_disks, targets};
use crate::children::ApiError;
use crate::resources::{dir_of, disk_file, for_attempt};
use crate::status::{StatusUpdate, now};

pub type JobUpdate<'a> = StatusUpdate<'a, BackupJob>;

/// The job waits (phase Pending) for something outside it.
pub fn waiting(u: &mut JobUpdate, wait: &Wait) {
    u.status.phase = Some(Phase::Pending);
    u.set(&Running::Waiting(wait.reason), wait.message.clone());
}

/// The plan is recorded: phase Running, attempt 1, the hub is to start.
pub fn started(u: &mut JobUpdate, plan: Plan) {
    let st = &mut u.status;
    st.phase = Some(Phase::Running);
    st.vm_name = Some(plan.vm_name.clone());
    st.vm_instance_uuid = Some(plan.vm_instance_uuid.clone()).filter(|u| !u.is_empty());
    if plan.vm_hardware.is_some() {
        st.vm_hardware = plan.vm_hardware.clone();
    }
    // A plan made again after a failed attempt (`replanning`) keeps the attempt count, the
    // start time and the next attempt's own directory.
    let attempt = st.attempts.unwrap_or(1);
    st.attempts = Some(attempt);
    st.start_time.get_or_insert_with(now);
    st.chain_parent = plan.chain_parent.clone();
    st.disks = plan.disks.clone();
    for d in st.disks.iter_mut() {
        if let Some(f) = d.file.as_deref() {
            d.file = Some(disk_file(&for_attempt(dir_of(f), attempt), d.device_key));
        }
    }
    u.set(
        &Running::HubStarting,
        format!(
            "attempt {attempt}: starting the hub for {} disk(s) on ports {}",
            plan.disks.len(),
            plan.ports_text()
        ),
    );
}

/// "42% (1.2 GiB of 2.8 GiB)".
pub fn progress_text(copied: u64, total: u64) -> String {
    let pct = (copied.min(total) * 100).checked_div(total).unwrap_or(100);
    format!("{pct}% ({} of {})", human_bytes(copied), human_bytes(total))
}

/// The agent's live progress, in status and the Running condition's message.
pub fn progress(u: &mut JobUpdate, attempt: i32, p: &ProgressReport) {
    let st = &mut u.status;
    st.bytes_to_copy = Some(p.bytes_to_copy as i64);
    st.bytes_copied = Some(p.bytes_copied as i64);
    for d in st.disks.iter_mut() {
        if let Some(dp) = p.disks.iter().find(|x| x.key == d.device_key) {
            d.bytes_to_copy = Some(dp.bytes_to_copy as i64);
            d.bytes_copied = Some(dp.bytes_copied as i64);
        }
    }
    let stage = match p.stage {
        // A stage this build does not know (a newer agent): it is past preparing.
        Stage::Unknown => Stage::Copying.as_str(),
        s => s.as_str(),
    };
    // Before the copy starts there is nothing to count yet: say what the agent is doing.
    let mut message = if p.bytes_to_copy == 0 && p.stage.is_preparing() {
        format!("attempt {attempt}: {stage}")
    } else {
        let text = progress_text(p.bytes_copied, p.bytes_to_copy);
        st.progress = Some(text.split(' ').next().unwrap_or_default().to_owned());
        format!("attempt {attempt}: {stage}: {text}")
    };
    let verified: u64 = p.disks.iter().map(|d| d.bytes_verified).sum();
    if verified > 0 {
        message = format!(
            "{message}; {} read back and verified",
            human_bytes(verified)
        );
    }
    u.set(&Running::Copying, message);
}

fn snapshot_status(s: &SnapshotReport) -> SnapshotStatus {
    SnapshotStatus {
        id: Some(s.id.clone()),
        name: Some(s.name.clone()),
        removed: s.removed,
        ..Default::default()
    }
}

/// The agent reported success: change IDs reached, sizes, the snapshot. The job stays Running
/// until the files are committed as a restore point; every disk having its change ID reached
/// is what says the copy is done (`copied`).
pub fn copied(u: &mut JobUpdate, attempt: i32, result: &BackupResult) {
    let st = &mut u.status;
    let mut total = 0u64;
    let mut written = 0u64;
    for d in st.disks.iter_mut() {
        if let Some(r) = result.disks.iter().find(|r| r.key == d.device_key) {
            d.change_id_reached = r.change_id_reached.clone();
            if !r.change_id_used.is_empty() {
                d.change_id_used = Some(r.change_id_used.clone());
            }
            d.bytes_to_copy = Some(r.bytes_to_copy as i64);
            d.bytes_copied = Some(r.bytes_to_copy as i64);
            d.bytes_written = Some(r.bytes_written as i64);
            d.bytes_verified = r.bytes_verified.map(|b| b as i64);
            let copy = match r.copy {
                Some(result::CopyKind::Incremental) => Some(CopyKind::Incremental),
                Some(result::CopyKind::Full) => Some(CopyKind::Full),
                None => d.copy,
            };
            // The plan's reason names the restore point and why a disk is copied in full (new,
            // resized); the agent knows neither. Its reason replaces the plan's only where it
            // departed from the plan (a change ID vCenter no longer accepts).
            if !r.reason.is_empty() && (copy != d.copy || d.copy_reason.is_none()) {
                d.copy_reason = Some(r.reason.clone());
            }
            d.copy = copy;
            total += r.bytes_to_copy;
            written += r.bytes_written;
        }
    }
    // When the data was complete: the restore point's time. The hub and agent go now, on
    // purpose.
    st.completion_time = Some(now());
    st.pods.clear();
    st.bytes_to_copy = Some(total as i64);
    st.bytes_copied = Some(total as i64);
    st.progress = Some("100%".into());
    st.size = Some(human_bytes(written));
    if let Some(s) = &result.snapshot {
        st.snapshot = Some(snapshot_status(s));
    }
    u.set(
        &Running::Committing,
        format!(
            "attempt {attempt}: copied and flushed ({} read from the snapshot, {} written); reading the files back to commit the restore point",
            human_bytes(total),
            human_bytes(written)
        ),
    );
    match &result.snapshot {
        Some(s) if !s.removed => u.set(
            &SnapshotRemoved::RemovalPending,
            format!(
                "the copy is complete and flushed, but snapshot {} ({}) is still on the VM: {}; the operator keeps removing it",
                s.name,
                s.id,
                s.removal_error.as_deref().unwrap_or("the agent could not remove it")
            ),
        ),
        _ => u.set(
            &SnapshotRemoved::Removed,
            "the backup's snapshot was removed",
        ),
    }
}

/// The copy of the current attempt is complete (every disk has its change ID reached) and
/// waits to be committed.
pub fn is_copied(job: &BackupJob) -> bool {
    job.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Running)
            && !s.disks.is_empty()
            && s.disks.iter().all(|d| d.change_id_reached.is_some())
    })
}

/// The restore point is committed: Succeeded, naming it. Earlier attempts' directories are
/// to be removed when there were any.
pub fn committed(u: &mut JobUpdate, restore_point: &str) {
    let st = &mut u.status;
    st.phase = Some(Phase::Succeeded);
    st.restore_point = Some(restore_point.to_owned());
    let attempts = st.attempts.unwrap_or(1);
    let disks = st.disks.len();
    let incremental = st
        .disks
        .iter()
        .filter(|d| d.copy == Some(CopyKind::Incremental))
        .count();
    let summary = format!(
        "backed up {disks} disk(s) ({incremental} incremental) into restore point {restore_point}: {} written",
        st.size.clone().unwrap_or_default()
    );
    u.set(&Running::Completed, summary.clone());
    u.set(&Complete, summary);
    if attempts > 1 {
        u.set(
            &FilesRemoved::Pending,
            format!(
                "removing the directories of the {} attempt(s) that did not commit",
                attempts - 1
            ),
        );
    }
}

/// The attempts' directories whose files may go: every attempt of a failed job, the attempts
/// before the committed one of a succeeded job.
pub fn uncommitted_dirs(job: &BackupJob) -> Vec<String> {
    let Some(st) = job.status.as_ref() else {
        return Vec::new();
    };
    let Some(file) = st.disks.iter().find_map(|d| d.file.as_deref()) else {
        return Vec::new();
    };
    let attempts = st.attempts.unwrap_or(1);
    let last = if st.phase == Some(Phase::Succeeded) {
        attempts - 1
    } else {
        attempts
    };
    (1..=last).map(|a| for_attempt(dir_of(file), a)).collect()
}

/// What the agent said of its snapshot, when it said anything.
pub fn record_snapshot(u: &mut JobUpdate, result: Option<&BackupResult>) {
    if let Some(s) = result.and_then(|r| r.snapshot.as_ref()) {
        u.status.snapshot = Some(snapshot_status(s));
    }
}

/// An attempt failed because the VM changed under the plan (a disk resized, added or
/// removed), and another is allowed: the job is planned again (`started` keeps the attempt
/// count), so a changed disk is copied in full into the next attempt's directory.
pub fn replanning(u: &mut JobUpdate, attempt: i32, allowed: i32, failure: &Failure) {
    retrying(u, attempt, allowed, failure);
    // No disk with a port: `planned` is false, and the next reconcile plans again.
    u.status.disks.clear();
    u.status.chain_parent = None;
    u.status.bytes_to_copy = None;
    u.set(
        &Running::Retrying,
        format!(
            "attempt {attempt} of {allowed} failed ({}): {}; the VM changed since the plan: planning attempt {} again",
            failure.reason.as_str(),
            failure.message,
            attempt + 1,
        ),
    );
}

/// An attempt failed and another is allowed: it starts after its back-off.
pub fn retrying(u: &mut JobUpdate, attempt: i32, allowed: i32, failure: &Failure) {
    u.status.attempts = Some(attempt + 1);
    u.status.bytes_copied = None;
    u.status.progress = None;
    u.status.completion_time = None;
    u.status.pods.clear();
    // The next attempt writes fresh files into its own directory, from a new snapshot.
    for d in u.status.disks.iter_mut() {
        d.change_id_reached = None;
        d.bytes_written = None;
        d.bytes_verified = None;
        if let Some(f) = d.file.as_deref() {
            d.file = Some(disk_file(
                &for_attempt(dir_of(f), attempt + 1),
                d.device_key,
            ));
        }
    }
    u.set(
        &Running::Retrying,
        format!(
            "attempt {attempt} of {allowed} failed ({}): {}; attempt {} starts in {}s",
            failure.reason.as_str(),
            failure.message,
            attempt + 1,
            retry_backoff(attempt + 1).as_secs()
        ),
    );
}

/// The last attempt failed: phase Failed, whether the snapshot is gone, files to remove.
pub fn failed(
    u: &mut JobUpdate,
    attempt: i32,
    failure: &Failure,
    snapshot: SnapshotRemoved,
    snapshot_message: String,
) {
    let removed = crate::status::ConditionReason::is_true(&snapshot);
    if let Some(s) = u.status.snapshot.as_mut() {
        s.removed = removed;
    }
    u.status.phase = Some(Phase::Failed);
    u.status.completion_time = Some(now());
    let reason = failure.reason.as_str();
    u.set(
        &Failed(&failure.reason),
        if failure.reason.class() == FailureClass::Fatal {
            format!(
                "failed in attempt {attempt}, not retried (another attempt cannot succeed): {}",
                failure.message
            )
        } else {
            format!("failed after {attempt} attempt(s): {}", failure.message)
        },
    );
    u.set(&Running::Failed, format!("{reason}: {}", failure.message));
    u.set(&snapshot, snapshot_message);
    u.set(
        &FilesRemoved::Pending,
        "removing the directories of this job's attempts from the repository",
    );
}

/// Writes the update (when it changed anything) and its Events. A step reached (the Running
/// reason changed), bytes copied or a new attempt is progress: `lastProgressTime` moves.
pub async fn write(mut u: JobUpdate<'_>, ctx: &super::context::Context) -> Result<(), ApiError> {
    mark_progress(&mut u);
    let job = u.object();
    if let Some(version) = u.write_versioned(&ctx.client, &ctx.recorder).await? {
        ctx.caches.wrote(job, version);
    }
    Ok(())
}

pub fn mark_progress(u: &mut JobUpdate) {
    let reason = |s: &sendense_crds::backup_job::BackupJobStatus| {
        sendense_crds::conditions::find(&s.conditions, "Running").map(|c| c.reason.clone())
    };
    let message = |s: &sendense_crds::backup_job::BackupJobStatus| {
        sendense_crds::conditions::find(&s.conditions, "Running").map(|c| c.message.clone())
    };
    let old = u.old();
    // While copying, the message moves only with the agent's stage and counters.
    let copying = reason(&u.status).as_deref() == Some("Copying");
    if reason(old) != reason(&u.status)
        || (copying && message(old) != message(&u.status))
        || old.bytes_copied < u.status.bytes_copied
        || old.attempts != u.status.attempts
    {
        u.status.last_progress_time = Some(now());
    }
}

/// Running reasons under `spec.progressDeadlineSeconds`: the attempt is meant to move on from
/// each (not a retry's back-off, not a wait before the plan). `Committing` has its own
/// deadline, which allows for reading every disk back (`commit::commit`).
fn under_progress_deadline(reason: &str) -> bool {
    [
        Running::HubStarting,
        Running::AgentStarting,
        Running::Copying,
        Running::Refused(JobPod::Hub),
        Running::Refused(JobPod::Agent),
        Running::Unschedulable(JobPod::Hub),
        Running::Unschedulable(JobPod::Agent),
    ]
    .iter()
    .any(|r| crate::status::ConditionReason::reason(r) == reason)
}

/// `failure`, or DeadlineExceeded (naming it) when the job is past its deadline at `now`.
pub fn past_deadline(job: &BackupJob, now: Timestamp, failure: Failure) -> Failure {
    let Some(left) = crate::resources::seconds_left(job, now) else {
        return failure;
    };
    let started = job.status.as_ref().and_then(|s| s.start_time.as_ref());
    if failure.reason == FailureReason::DeadlineExceeded || started.is_none() || left > 1 {
        return failure;
    }
    Failure::new(
        FailureReason::DeadlineExceeded,
        format!(
            "the job ran longer than spec.activeDeadlineSeconds ({} s); its last attempt ended with {}: {}",
            job.spec.active_deadline_seconds.unwrap_or_default(),
            failure.reason.as_str(),
            failure.message
        ),
    )
}

/// The job past `spec.activeDeadlineSeconds` (fatal), or the attempt without progress for
/// `spec.progressDeadlineSeconds` (retried): the failure, when either is so at `now`.
pub fn overdue(job: &BackupJob, now: Timestamp) -> Option<Failure> {
    let st = job.status.as_ref()?;
    if let (Some(limit), Some(started)) = (job.spec.active_deadline_seconds, &st.start_time)
        && now.as_second() - started.0.as_second() >= limit
    {
        return Some(Failure::new(
            FailureReason::DeadlineExceeded,
            format!(
                "the job ran longer than spec.activeDeadlineSeconds ({} s)",
                job.spec.active_deadline_seconds.unwrap_or_default()
            ),
        ));
    }
    let running = sendense_crds::conditions::find(&st.conditions, "Running")?;
    if !under_progress_deadline(&running.reason) {
        return None;
    }
    let since = st
        .last_progress_time
        .as_ref()
        .unwrap_or(&running.last_transition_time)
        .0;
    let limit = job.spec.progress_deadline_seconds;
    let idle = now.as_second() - since.as_second();
    (idle >= limit).then(|| {
        Failure::new(
            FailureReason::ProgressDeadlineExceeded,
            format!(
                "no progress for {idle} s (spec.progressDeadlineSeconds: {limit}) at: {} ({})",
                running.message, running.reason
            ),
        )
    })
}

/// Records a pod the attempt created (by UID), so that losing it fails the attempt.
pub fn created_pod(u: &mut JobUpdate, pod: &k8s_openapi::api::core::v1::Pod) {
    use kube::ResourceExt;
    let (name, uid) = (pod.name_any(), pod.uid().unwrap_or_default());
    if uid.is_empty() {
        return;
    }
    u.status.pods.retain(|p| p.name != name);
    u.status.pods.push(AttemptPod { name, uid });
}

/// A pod the attempt created that is gone, replaced or being deleted: what happened to it.
/// `current`: the pods of those names as they are now.
pub fn lost_pod(
    job: &BackupJob,
    current: &[&Option<k8s_openapi::api::core::v1::Pod>],
) -> Option<String> {
    use kube::ResourceExt;
    let st = job.status.as_ref()?;
    let attempt = st.attempts.unwrap_or(1);
    for recorded in &st.pods {
        let now = current
            .iter()
            .filter_map(|p| p.as_ref())
            .find(|p| p.name_any() == recorded.name);
        let what = match now {
            None => "disappeared",
            Some(p) if p.uid().as_deref() != Some(recorded.uid.as_str()) => {
                "was replaced by another pod of its name"
            }
            Some(p) if p.metadata.deletion_timestamp.is_some() => "is being deleted",
            Some(_) => continue,
        };
        return Some(format!(
            "pod {} of attempt {attempt} {what} while the attempt ran: its files may be half-written, so the attempt is abandoned",
            recorded.name
        ));
    }
    None
}
