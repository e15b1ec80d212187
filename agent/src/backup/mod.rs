//! One backup of one VM: ONE snapshot for all disks, the changed areas of every disk copied to
//! its hub target, the change IDs reached recorded only after the data is flushed, and the
//! snapshot removed on every path — success, failure, deadline or SIGTERM.
//!
//! The steps, in order: [`plan`] (the command line, checked), [`vm`] (find it, check its
//! disks, CBT on), [`snapshot`] (leftovers, create), [`disk`] (every disk's copy), then
//! [`snapshot`] again (remove, retried; a snapshot not removed does not fail a complete copy).
//! A failed step is a [`Failure`]: a reason and a message.

mod disk;
mod failure;
pub mod plan;
pub mod progress;
mod snapshot;
pub mod stop;
mod vm;

use std::future::Future;

use sendense_contract::AgentReason;
use sendense_contract::progress::Stage;
use sendense_contract::result::{BackupResult, SnapshotReport};
use sendense_vsphere::VSphere;

pub use failure::{Failure, vsphere_reason};
pub use plan::BackupPlan;
pub use progress::LiveProgress;
pub use stop::StopReason;

/// Runs the backup. `stop` resolves when the agent must stop early (deadline, SIGTERM): the
/// copy is abandoned, the snapshot still removed.
pub async fn run(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    stop: impl Future<Output = StopReason>,
) -> BackupResult {
    let mut result = BackupResult::default();
    if let Err(f) = snapshot_and_copy(vs, plan, live, &mut result, stop).await {
        result.error = Some(f.message);
        result.reason = Some(f.reason);
    }
    // The data decides: a copy that is complete and flushed is a success even when the
    // snapshot could not be removed (`snapshot.removed` says so).
    result.ok = result.error.is_none()
        && result.snapshot.is_some()
        && result
            .disks
            .iter()
            .all(|d| d.error.is_none() && d.change_id_reached.is_some());
    if !result.ok && result.reason.is_none() {
        // Not reached today (every failure path sets an error); a failed result always says why.
        result.reason = Some(AgentReason::CopyFailed);
        result
            .error
            .get_or_insert_with(|| "a disk was not copied completely".into());
    }
    live.set_stage(Stage::Done);
    result
}

async fn snapshot_and_copy(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    result: &mut BackupResult,
    stop: impl Future<Output = StopReason>,
) -> Result<(), Failure> {
    live.set_stage(Stage::Connecting);
    let vm = vm::find(vs, &plan.datacenter, &plan.vm).await?;
    result.vm = Some(vm.name.clone());
    result.vm_moref = Some(vm.moref.clone());
    result.instance_uuid = Some(vm.instance_uuid.clone());
    let cbt = vm::check_disks_and_cbt(vs, &vm, plan.targets.keys().copied()).await?;
    result.cbt_enabled_now = cbt == vm::Cbt::EnabledNow;

    live.set_stage(Stage::Snapshot);
    result.leftover_snapshots_removed =
        snapshot::remove_leftovers(vs, &vm, &plan.snapshot_prefix).await?;
    let snapshot = snapshot::create(
        vs,
        &vm,
        &plan.snapshot_prefix,
        &plan.job,
        plan.job_uid.as_deref(),
        plan.quiesce,
    )
    .await?;
    result.snapshot = Some(SnapshotReport {
        id: snapshot.moref.clone(),
        name: snapshot.name.clone(),
        ..Default::default()
    });

    // Everything between creating and removing the snapshot; whatever happens in it, the
    // snapshot is removed below.
    live.set_stage(Stage::Copying);
    let copy = async {
        let disks = snapshot::disks(vs, &snapshot).await?;
        let on = disk::Snapshot {
            vs,
            plan,
            vm: &vm,
            snapshot: &snapshot,
            cbt,
        };
        disk::copy_all(&on, disks, live).await
    };
    let copied = tokio::select! {
        r = copy => r,
        why = stop => Err(Failure::new(
            AgentReason::Stopped,
            format!("stopped before the copy finished: {why}"),
        )),
    };
    live.set_stage(Stage::RemovingSnapshot);
    let removal = snapshot::remove(vs, &vm, &snapshot, snapshot::REMOVAL_BUDGET).await;
    if let Some(s) = result.snapshot.as_mut() {
        s.removed = removal.is_ok();
        s.removal_error = removal.as_ref().err().map(|e| e.to_string());
    }
    // A snapshot that could not be removed does not make complete, flushed data less valid:
    // the result says so (`snapshot.removed` false), and the operator keeps removing it.
    result.disks = copied?;
    Ok(())
}
