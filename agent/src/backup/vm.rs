//! The VM: found by name or instance UUID, checked to have every disk the backup targets, and
//! changed block tracking turned on when it is off.

use tracing::info;

use sendense_contract::AgentReason;
use sendense_vsphere::{VSphere, VSphereError, VmRef, VmSelector};

use super::failure::{Failure, failure_from, find_vm_reason, vsphere_reason};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Find(#[source] VSphereError),
    #[error("reading VM {vm}'s configuration: {source}")]
    Info {
        vm: String,
        #[source]
        source: VSphereError,
    },
    #[error("VM {vm} has no disk with device key {key} (its disks: {known:?})")]
    NoSuchDisk {
        vm: String,
        key: i32,
        known: Vec<i32>,
    },
    #[error("enabling changed block tracking: {0}")]
    EnableCbt(#[source] VSphereError),
}

impl VmError {
    pub fn reason(&self) -> AgentReason {
        match self {
            VmError::Find(e) => find_vm_reason(e),
            VmError::Info { source, .. } => vsphere_reason(source, AgentReason::VmNotFound),
            VmError::NoSuchDisk { .. } => AgentReason::DiskNotFound,
            VmError::EnableCbt(e) => vsphere_reason(e, AgentReason::CbtEnableFailed),
        }
    }
}

failure_from!(VmError);

/// Whether changed block tracking was on before this backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cbt {
    WasOn,
    /// Turned on by this backup: change IDs from before mean nothing.
    EnabledNow,
}

pub async fn find(vs: &VSphere, datacenter: &str, selector: &VmSelector) -> Result<VmRef, VmError> {
    vs.find_vm(datacenter, selector)
        .await
        .map_err(VmError::Find)
}

/// Checks that the VM has a disk for every key in `targets`, then makes sure CBT is on.
pub async fn check_disks_and_cbt(
    vs: &VSphere,
    vm: &VmRef,
    targets: impl IntoIterator<Item = i32>,
) -> Result<Cbt, VmError> {
    let info = vs.vm_info(vm).await.map_err(|source| VmError::Info {
        vm: vm.name.clone(),
        source,
    })?;
    let known: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
    if let Some(key) = targets.into_iter().find(|key| !known.contains(key)) {
        return Err(VmError::NoSuchDisk {
            vm: vm.name.clone(),
            key,
            known,
        });
    }
    if info.cbt_enabled {
        return Ok(Cbt::WasOn);
    }
    info!(vm = %vm.name, "enabling changed block tracking");
    vs.enable_cbt(vm).await.map_err(VmError::EnableCbt)?;
    Ok(Cbt::EnabledNow)
}
