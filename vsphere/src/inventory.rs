//! Finding a VM and reading what a backup needs of it: CBT, disks, snapshots.

use vim_rs::mo::SearchIndex;
use vim_rs::types::enums::MoTypesEnum;
use vim_rs::types::structs::{
    ManagedObjectReference, VirtualMachineSnapshotInfo, VirtualMachineSnapshotTree,
};

use super::disks::disks_from_devices;
use super::props::moref;
use super::{Disk, SnapshotRef, VSphere, VSphereError};

/// How a BackupJob names its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSelector {
    /// The inventory name (unique within the datacenter, or the lookup fails).
    Name(String),
    /// `config.instanceUuid`, vCenter's stable identity of a VM.
    InstanceUuid(String),
}

/// A found VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRef {
    /// Managed object id, e.g. `vm-62`.
    pub moref: String,
    pub name: String,
    pub instance_uuid: String,
}

/// What a backup needs to know of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
    /// The whole snapshot tree, flattened, parents before children.
    pub snapshots: Vec<SnapshotRef>,
}

impl VmRef {
    pub(super) fn mor(&self) -> ManagedObjectReference {
        moref(MoTypesEnum::VirtualMachine, &self.moref)
    }
}

impl VSphere {
    /// Finds a VM in a datacenter by name or instance UUID.
    pub async fn find_vm(&self, datacenter: &str, vm: &VmSelector) -> Result<VmRef, VSphereError> {
        let dc = &self.find_datacenter(datacenter).await?;
        match vm {
            VmSelector::Name(name) => {
                let mut matches = Vec::new();
                for mut props in self
                    .properties_in_container(
                        dc,
                        MoTypesEnum::VirtualMachine,
                        &["name", "config.instanceUuid"],
                    )
                    .await?
                {
                    if props.string("name")?.as_deref() == Some(name.as_str()) {
                        matches.push(VmRef {
                            moref: props.obj.value.clone(),
                            name: name.clone(),
                            instance_uuid: props.string("config.instanceUuid")?.unwrap_or_default(),
                        });
                    }
                }
                match matches.len() {
                    0 => Err(VSphereError::NotFound(format!(
                        "VM named {name:?} in datacenter {datacenter:?}"
                    ))),
                    1 => Ok(matches.remove(0)),
                    n => Err(VSphereError::Fault {
                        method: "find_vm".to_string(),
                        fault: "DuplicateName".to_string(),
                        message: format!(
                            "{n} VMs are named {name:?} in datacenter {datacenter:?}: select the \
                             VM by instance UUID"
                        ),
                    }),
                }
            }
            VmSelector::InstanceUuid(uuid) => {
                let search_index = self
                    .client
                    .service_content()
                    .search_index
                    .clone()
                    .ok_or_else(|| {
                        VSphereError::Transport("the server has no SearchIndex".into())
                    })?;
                let search_index = &search_index;
                let found = self
                    .call("FindByUuid", || async move {
                        SearchIndex::new(self.handle(), &search_index.value)
                            .find_by_uuid(Some(dc), uuid, true, Some(true))
                            .await
                    })
                    .await?;
                let not_found = || {
                    VSphereError::NotFound(format!(
                        "VM with instance UUID {uuid} in datacenter {datacenter:?}"
                    ))
                };
                let vm = found.ok_or_else(not_found)?;
                let mut props = self
                    .properties(&vm, &["name", "config.instanceUuid"])
                    .await?
                    .ok_or_else(not_found)?;
                Ok(VmRef {
                    moref: vm.value,
                    name: props.string("name")?.unwrap_or_default(),
                    instance_uuid: props
                        .string("config.instanceUuid")?
                        .unwrap_or_else(|| uuid.clone()),
                })
            }
        }
    }

    /// CBT state, disks (with their current change IDs) and the snapshot tree of a VM.
    pub async fn vm_info(&self, vm: &VmRef) -> Result<VmInfo, VSphereError> {
        let mut props = self
            .properties(
                &vm.mor(),
                &[
                    "config.changeTrackingEnabled",
                    "config.hardware.device",
                    "snapshot",
                ],
            )
            .await?
            .ok_or_else(|| VSphereError::NotFound(format!("VM {} ({})", vm.name, vm.moref)))?;
        let cbt_enabled = props
            .boolean("config.changeTrackingEnabled")?
            .unwrap_or(false);
        let disks = disks_from_devices(props.value("config.hardware.device"))?;
        // Absent when the VM has no snapshot.
        let snapshots = props
            .object::<VirtualMachineSnapshotInfo>("snapshot")?
            .map(|info| flatten(&info.root_snapshot_list))
            .unwrap_or_default();
        Ok(VmInfo {
            cbt_enabled,
            disks,
            snapshots,
        })
    }

    pub(super) async fn find_datacenter(
        &self,
        name: &str,
    ) -> Result<ManagedObjectReference, VSphereError> {
        let root = self.client.service_content().root_folder.clone();
        for mut props in self
            .properties_in_container(&root, MoTypesEnum::Datacenter, &["name"])
            .await?
        {
            if props.string("name")?.as_deref() == Some(name) {
                return Ok(props.obj);
            }
        }
        Err(VSphereError::NotFound(format!("datacenter {name:?}")))
    }
}

fn flatten(trees: &[VirtualMachineSnapshotTree]) -> Vec<SnapshotRef> {
    let mut out = Vec::new();
    let mut stack: Vec<&VirtualMachineSnapshotTree> = trees.iter().rev().collect();
    while let Some(node) = stack.pop() {
        out.push(SnapshotRef {
            moref: node.snapshot.value.clone(),
            name: node.name.clone(),
        });
        if let Some(children) = &node.child_snapshot_list {
            stack.extend(children.iter().rev());
        }
    }
    out
}
