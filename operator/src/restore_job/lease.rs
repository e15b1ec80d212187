//! An in-place restore holds the VM's Lease (`crate::vm_lease`, the one a BackupJob of the VM
//! takes) from its start to its end: a backup cannot snapshot the VM while its disks are being
//! written, and a restore does not start while a backup (or another in-place restore) of the
//! VM runs; it waits, `VMBusy`, naming that job. The Lease is named by the vCenter's identity,
//! which takes a login to learn; a vCenter that cannot be used is waited for up to the
//! progress deadline. A restore to a new VM takes no Lease: nothing else knows that VM yet.

use kube::ResourceExt;
use sendense_crds::{RestoreJob, RestorePoint, SourceNode};

use super::{Context, Error, FailureReason, Running, api_err};
use crate::vcenter::Session;
use crate::vm_lease::{self, HeldBy, lease_name, restore_holder};

/// What taking the Lease came to.
pub(super) enum Taken {
    /// The Lease is this job's; its name.
    Yes(String),
    /// Not yet: the Running condition to show, and when to look again (seconds).
    Wait(Running, String, u64),
    /// Never: the job fails, nothing written.
    Fail(FailureReason, String),
}

/// Seconds since the job was created.
pub(super) fn age_seconds(job: &RestoreJob) -> i64 {
    job.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second())
        .unwrap_or_default()
}

/// Takes the Lease of the restore point's VM in the vCenter of `sn` for `job`.
pub(super) async fn take(
    job: &RestoreJob,
    ctx: &Context,
    sn: &SourceNode,
    rp: &RestorePoint,
) -> Result<Taken, Error> {
    let session = match Session::connect(sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok(s) => s,
        Err(p) => {
            let message = format!(
                "SourceNode {}: {} (an in-place restore first takes the VM's Lease, which is named by the vCenter's identity); nothing was written",
                sn.name_any(),
                p.message
            );
            let waited = age_seconds(job);
            if waited > job.spec.progress_deadline_seconds {
                let message = format!(
                    "{message}; waited {waited} s (spec.progressDeadlineSeconds {})",
                    job.spec.progress_deadline_seconds
                );
                return Ok(Taken::Fail(FailureReason::VCenter(p.kind), message));
            }
            let again = if p.kind.transient() { 15 } else { 30 };
            return Ok(Taken::Wait(Running::VCenter(p.kind), message, again));
        }
    };
    let identity = session.identity(sn);
    session.logout().await;
    let vm = &rp.spec.vm;
    // A restore point always records the instance UUID; a hand-made one without it still
    // serializes restores of that VM by name.
    let id = if vm.instance_uuid.is_empty() {
        &vm.name
    } else {
        &vm.instance_uuid
    };
    let name = lease_name(&identity, id);
    let held = vm_lease::acquire(
        &ctx.client,
        &ctx.lease_namespace,
        &name,
        &restore_holder(job),
        &vm.name,
    )
    .await
    .map_err(api_err(job))?;
    Ok(match held {
        Ok(()) => Taken::Yes(name),
        Err(HeldBy(other)) => Taken::Wait(
            Running::VmBusy,
            format!(
                "{other} holds VM {} (the same VM of the same vCenter); this restore starts when it ends, nothing was written yet",
                vm.name
            ),
            10,
        ),
    })
}

/// Releases the job's Lease, if it took one and still holds it.
pub(super) async fn release(job: &RestoreJob, ctx: &Context) -> Result<(), Error> {
    if let Some(lease) = job.status.as_ref().and_then(|s| s.vm_lease.as_deref()) {
        vm_lease::release(
            &ctx.client,
            &ctx.lease_namespace,
            lease,
            &restore_holder(job),
        )
        .await
        .map_err(api_err(job))?;
    }
    Ok(())
}
