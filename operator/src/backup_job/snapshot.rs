//! The backup's vSphere snapshot after the last attempt: confirmed gone in vCenter (the agent
//! removes it; one left behind is removed by the operator), and, while vCenter cannot confirm
//! it, hunted with back-off until it can.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sendense_contract::result::BackupResult;
use sendense_crds::{BackupJob, SourceNode};

use super::context::Context;
use super::dereference::vm_selector;
use super::finish::Error;
use super::outcome::SnapshotRemoved;
use super::status::{self, JobUpdate};
use crate::children::get;
use crate::status::holding;
use crate::vcenter::{Session, VSphereError};

/// After the last attempt: is a snapshot of this job left on the VM? Removes it if so.
pub(super) async fn confirm_snapshot_removed(
    job: &BackupJob,
    ctx: &Context,
    result: Option<&BackupResult>,
) -> (SnapshotRemoved, String) {
    // The agent names the snapshot after the job and the start of its UID (agents before
    // that: after the job alone).
    let uid8: String = job.uid().unwrap_or_default().chars().take(8).collect();
    let wanted = format!("sendense-{}-{uid8}", job.name_any());
    let legacy = format!("sendense-{}", job.name_any());
    if let Some(s) = result.and_then(|r| r.snapshot.as_ref())
        && s.removed
    {
        return (
            SnapshotRemoved::Removed,
            format!("the agent removed snapshot {} ({})", s.name, s.id),
        );
    }
    let ns = job.namespace().unwrap_or_default();
    let sn_name = &job.spec.source_node_ref.name;
    let Ok(Some(sn)) = get::<SourceNode>(&ctx.client, &ns, sn_name).await else {
        return (
            SnapshotRemoved::Unverified,
            format!(
                "could not check vCenter for snapshot {wanted}: SourceNode {sn_name} unavailable"
            ),
        );
    };
    let session = match Session::connect(&sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok(s) => s,
        Err(p) => {
            return (
                SnapshotRemoved::Unverified,
                format!(
                    "could not check vCenter for snapshot {wanted}: {}",
                    p.message
                ),
            );
        }
    };
    let (selector, _) = vm_selector(job);
    let vs = &session.vsphere;
    let outcome = async {
        let vm = match vs.find_vm(&sn.spec.datacenter, &selector).await {
            Ok(vm) => vm,
            Err(VSphereError::NotFound(_)) => {
                return Ok((SnapshotRemoved::NoSnapshot, "the VM does not exist".into()));
            }
            Err(e) => return Err(e),
        };
        let info = vs.vm_info(&vm).await?;
        // By the id the agent reported, and by name (an agent that could not report it).
        let id = job
            .status
            .as_ref()
            .and_then(|s| s.snapshot.as_ref())
            .and_then(|s| s.id.clone());
        let left: Vec<_> = info
            .snapshots
            .iter()
            .filter(|s| s.name == wanted || s.name == legacy || Some(&s.moref) == id.as_ref())
            .collect();
        if left.is_empty() {
            return Ok((
                SnapshotRemoved::NoSnapshot,
                format!("vCenter shows no snapshot {wanted} on VM {}", vm.name),
            ));
        }
        // Safe to repeat: one already gone (an earlier request completed late) is success.
        for s in &left {
            vs.ensure_snapshot_removed(&vm, s).await?;
        }
        Ok((
            SnapshotRemoved::RemovedByOperator,
            format!(
                "the operator removed {} leftover snapshot(s) {wanted} from VM {}",
                left.len(),
                vm.name
            ),
        ))
    }
    .await;
    session.logout().await;
    outcome.unwrap_or_else(|e: VSphereError| {
        (
            SnapshotRemoved::RemovalFailed,
            format!("snapshot {wanted} may be left on the VM: {e}; remove it in vCenter"),
        )
    })
}

/// Back-off between the operator's attempts at removing a snapshot left on the VM: 15 s after
/// the first, doubling, at most 10 minutes.
pub fn hunt_backoff(attempts: i32) -> Duration {
    Duration::from_secs((15u64 << attempts.clamp(0, 6)).min(600))
}

/// Where the hunt for a job's snapshot is.
pub(super) enum Hunt {
    /// Nothing to hunt: the snapshot is gone (or the job is being deleted and its SourceNode
    /// is gone, so vCenter cannot be asked any more).
    Done,
    /// The next attempt is due in this long.
    Wait(Duration),
    /// An attempt was made and recorded; the next reconcile reads it.
    Attempted,
}

/// A finished job whose snapshot is still on the VM (`SnapshotRemoved=False` with a hunted
/// reason): at each back-off the snapshot is looked up in vCenter and removed, until vCenter
/// confirms it gone; then the condition turns True. The attempts are counted in status, so
/// an operator restart resumes the hunt where it was. No agent pod is needed.
pub(super) async fn hunt_snapshot(job: &BackupJob, ctx: &Context) -> Result<Hunt, Error> {
    let st = job.status.clone().unwrap_or_default();
    let Some(hunted) = SnapshotRemoved::HUNTED
        .into_iter()
        .find(|r| holding(&st.conditions, r).is_some())
    else {
        return Ok(Hunt::Done);
    };
    let snap = st.snapshot.clone().unwrap_or_default();
    let attempts = snap.removal_attempts.unwrap_or(0);
    if let Some(last) = &snap.last_removal_attempt {
        let due = last.0.as_millisecond() + hunt_backoff(attempts).as_millis() as i64;
        let left = due - Timestamp::now().as_millisecond();
        if left > 0 {
            return Ok(Hunt::Wait(Duration::from_millis(left as u64)));
        }
    }
    if job.metadata.deletion_timestamp.is_some() {
        let ns = job.namespace().unwrap_or_default();
        let sn = &job.spec.source_node_ref.name;
        if get::<SourceNode>(&ctx.client, &ns, sn)
            .await
            .map_err(Error::Remove)?
            .is_none()
        {
            tracing::warn!(job = %job.name_any(), snapshot = ?snap.name,
                "deleted, and its SourceNode is gone: no longer removing its snapshot (the next backup of the VM removes it)");
            return Ok(Hunt::Done);
        }
    }
    let (outcome, message) = confirm_snapshot_removed(job, ctx, None).await;
    let attempt = attempts + 1;
    let mut u = JobUpdate::new(job);
    let s = u.status.snapshot.get_or_insert_with(Default::default);
    s.removal_attempts = Some(attempt);
    s.last_removal_attempt = Some(crate::status::now());
    if crate::status::ConditionReason::is_true(&outcome) {
        s.removed = true;
        u.set(
            &outcome,
            format!("{message} (the operator's attempt {attempt})"),
        );
    } else {
        // A complete backup's snapshot stays "RemovalPending" until it is gone.
        let reason = if hunted == SnapshotRemoved::RemovalPending {
            hunted
        } else {
            outcome
        };
        u.set(
            &reason,
            format!(
                "{message} (the operator's attempt {attempt}; the next in {} s)",
                hunt_backoff(attempt).as_secs()
            ),
        );
    }
    status::write(u, ctx).await.map_err(Error::Status)?;
    Ok(Hunt::Attempted)
}
