//! CBT on, snapshots made, read and removed: each a vSphere task waited for.

use vim_rs::mo::{VirtualMachine, VirtualMachineSnapshot};
use vim_rs::types::enums::MoTypesEnum;
use vim_rs::types::structs::{ManagedObjectReference, VirtualMachineConfigSpec};

use super::disks::disks_from_devices;
use super::props::moref;
use super::tasks::result_moref;
use super::{Disk, VSphere, VSphereError, VmRef};

/// One snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    /// Managed object id, e.g. `snapshot-66`.
    pub moref: String,
    pub name: String,
}

impl SnapshotRef {
    pub(super) fn mor(&self) -> ManagedObjectReference {
        moref(MoTypesEnum::VirtualMachineSnapshot, &self.moref)
    }
}

/// How [`VSphere::ensure_snapshot_removed`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// This request removed it.
    Removed,
    /// It was not there any more.
    AlreadyGone,
}

/// `VirtualMachineConfigSpec` has some eighty optional fields and vim_rs builds `Default` only
/// behind a heavy feature: build the one-field spec from its wire form instead.
fn cbt_on_spec() -> Result<VirtualMachineConfigSpec, VSphereError> {
    miniserde::json::from_str(
        r#"{"_typeName":"VirtualMachineConfigSpec","changeTrackingEnabled":true}"#,
    )
    .map_err(|_| VSphereError::Transport("building the CBT config spec".to_string()))
}

impl VSphere {
    /// Turns Changed Block Tracking on (`ReconfigVM_Task`, `changeTrackingEnabled = true`) and
    /// waits for the task. Does nothing when it is on already: enabling it again would not
    /// help, and must not risk resetting tracking.
    pub async fn enable_cbt(&self, vm: &VmRef) -> Result<(), VSphereError> {
        if self.vm_info(vm).await?.cbt_enabled {
            return Ok(());
        }
        let spec = &cbt_on_spec()?;
        let task = self
            .call("ReconfigVM_Task", || async move {
                VirtualMachine::new(self.handle(), &vm.moref)
                    .reconfig_vm_task(spec)
                    .await
            })
            .await?;
        self.wait_task(&task, &format!("enabling CBT on VM {}", vm.name))
            .await?;
        tracing::info!(vm = %vm.name, "enabled changed block tracking");
        Ok(())
    }

    /// Takes one snapshot of the whole VM, without memory; waits for the task.
    pub async fn create_snapshot(
        &self,
        vm: &VmRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<SnapshotRef, VSphereError> {
        let task = self
            .call("CreateSnapshot_Task", || async move {
                VirtualMachine::new(self.handle(), &vm.moref)
                    .create_snapshot_task(name, Some(description), false, quiesce)
                    .await
            })
            .await?;
        let what = format!("creating snapshot {name:?} of VM {}", vm.name);
        let result = self.wait_task(&task, &what).await?;
        let snapshot =
            result_moref(result, MoTypesEnum::VirtualMachineSnapshot).ok_or_else(|| {
                VSphereError::Task {
                    what: what.clone(),
                    message: "the task succeeded without naming the snapshot".to_string(),
                }
            })?;
        tracing::info!(vm = %vm.name, snapshot = %snapshot.value, name, "created snapshot");
        Ok(SnapshotRef {
            moref: snapshot.value,
            name: name.to_string(),
        })
    }

    /// The disks of a snapshot (`config.hardware.device` of the snapshot object): the frozen
    /// files and the change IDs of the disks at the snapshot instant.
    pub async fn snapshot_disks(&self, snapshot: &SnapshotRef) -> Result<Vec<Disk>, VSphereError> {
        let mut props = self
            .properties(&snapshot.mor(), &["config.hardware.device"])
            .await?
            .ok_or_else(|| snapshot_not_found(snapshot))?;
        disks_from_devices(props.value("config.hardware.device"))
    }

    /// Removes one snapshot (its children stay; its data is consolidated); waits for the task.
    pub async fn remove_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), VSphereError> {
        let task = self
            .call("RemoveSnapshot_Task", || async move {
                VirtualMachineSnapshot::new(self.handle(), &snapshot.moref)
                    .remove_snapshot_task(false, Some(true))
                    .await
            })
            .await
            .map_err(|e| match e {
                VSphereError::NotFound(_) => snapshot_not_found(snapshot),
                e => e,
            })?;
        self.wait_task(
            &task,
            &format!("removing snapshot {:?} ({})", snapshot.name, snapshot.moref),
        )
        .await?;
        tracing::info!(snapshot = %snapshot.moref, name = %snapshot.name, "removed snapshot");
        Ok(())
    }

    /// Removes the snapshot so that asking again is always safe: the VM's snapshot tree is looked
    /// up first, and a snapshot not in it is gone (an earlier request completed, perhaps after
    /// its answer was lost). A request that fails (a timeout, a `TaskInProgress` or
    /// `InvalidState` fault while another removal of it runs) is followed by another look: gone
    /// then is success too. Only a snapshot still there after a failed request is an error.
    pub async fn ensure_snapshot_removed(
        &self,
        vm: &VmRef,
        snapshot: &SnapshotRef,
    ) -> Result<Removal, VSphereError> {
        if !self.has_snapshot(vm, snapshot).await? {
            return Ok(Removal::AlreadyGone);
        }
        match self.remove_snapshot(snapshot).await {
            Ok(()) => Ok(Removal::Removed),
            Err(VSphereError::NotFound(_)) => Ok(Removal::AlreadyGone),
            Err(e) => match self.has_snapshot(vm, snapshot).await {
                Ok(false) => {
                    tracing::info!(snapshot = %snapshot.moref, error = %e,
                        "the removal request failed, but the snapshot is gone");
                    Ok(Removal::Removed)
                }
                _ => Err(e),
            },
        }
    }

    /// Whether the VM's snapshot tree holds this snapshot (by its managed object id). A VM
    /// that no longer exists holds none.
    pub async fn has_snapshot(
        &self,
        vm: &VmRef,
        snapshot: &SnapshotRef,
    ) -> Result<bool, VSphereError> {
        match self.vm_info(vm).await {
            Ok(info) => Ok(info.snapshots.iter().any(|s| s.moref == snapshot.moref)),
            Err(VSphereError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the VM's snapshots whose name starts with `prefix` (leftovers of earlier runs)
    /// and returns them. Others are left alone. Every match is attempted; the first failure is
    /// returned after the others were tried.
    pub async fn remove_snapshots_with_prefix(
        &self,
        vm: &VmRef,
        prefix: &str,
    ) -> Result<Vec<SnapshotRef>, VSphereError> {
        if prefix.is_empty() {
            return Err(VSphereError::Fault {
                method: "remove_snapshots_with_prefix".to_string(),
                fault: "InvalidArgument".to_string(),
                message: "an empty prefix would remove every snapshot of the VM".to_string(),
            });
        }
        let leftovers: Vec<SnapshotRef> = self
            .vm_info(vm)
            .await?
            .snapshots
            .into_iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect();
        let mut removed = Vec::new();
        let mut first_error = None;
        // Children first: removing a parent first would only make the child's removal slower.
        for snapshot in leftovers.into_iter().rev() {
            match self.remove_snapshot(&snapshot).await {
                Ok(()) => removed.push(snapshot),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, snapshot = %snapshot.moref, error = %e,
                        "could not remove a leftover snapshot");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                removed.reverse();
                Ok(removed)
            }
        }
    }
}

fn snapshot_not_found(snapshot: &SnapshotRef) -> VSphereError {
    VSphereError::NotFound(format!("snapshot {:?} ({})", snapshot.name, snapshot.moref))
}
