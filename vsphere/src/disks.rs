//! Virtual disks as `config.hardware.device` describes them, of a VM or of a snapshot.

use vim_rs::types::boxed_types::ValueElements;
use vim_rs::types::structs::{
    VirtualDisk, VirtualDiskFlatVer2BackingInfo, VirtualDiskRawDiskMappingVer1BackingInfo,
    VirtualDiskRawDiskVer2BackingInfo, VirtualDiskSeSparseBackingInfo,
    VirtualDiskSparseVer2BackingInfo,
};
use vim_rs::types::traits::{VirtualDeviceBackingInfoTrait, VirtualDeviceTrait};
use vim_rs::types::vim_any::VimAny;

use super::VSphereError;

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Device key: 2000, 2001, ...
    pub key: i32,
    /// "Hard disk 1", ...
    pub label: String,
    /// Bytes.
    pub capacity: u64,
    /// The backing's descriptor, `"[datastore] dir/name.vmdk"`. For a snapshot's disk, the
    /// frozen file.
    pub file_name: String,
    /// The CBT change ID of this disk state; `None` while CBT is off.
    pub change_id: Option<String>,
}

/// The disks among the devices of a `config.hardware.device` value (absent: none).
pub(super) fn disks_from_devices(devices: Option<VimAny>) -> Result<Vec<Disk>, VSphereError> {
    let devices = match devices {
        None => return Ok(Vec::new()),
        Some(VimAny::Value(ValueElements::ArrayOfVirtualDevice(devices))) => devices,
        Some(other) => {
            return Err(VSphereError::Transport(format!(
                "config.hardware.device is {}, not ArrayOfVirtualDevice",
                vim_rs::core::pc_helpers::type_name(&other)
            )));
        }
    };
    Ok(devices.iter().filter_map(|d| disk_of(d.as_ref())).collect())
}

fn disk_of(device: &dyn VirtualDeviceTrait) -> Option<Disk> {
    let disk = device.as_any_ref().downcast_ref::<VirtualDisk>()?;
    let key = disk.key;
    let label = disk
        .device_info
        .as_ref()
        .map(|d| d.label.clone())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| format!("disk {key}"));
    // capacityInBytes is authoritative when present (capacityInKB rounds down).
    let capacity = disk
        .capacity_in_bytes
        .filter(|b| *b > 0)
        .unwrap_or(disk.capacity_in_kb.saturating_mul(1024));
    let (file_name, change_id) = disk
        .backing
        .as_deref()
        .and_then(backing_file_and_change_id)
        .unwrap_or_default();
    Some(Disk {
        key,
        label,
        capacity: u64::try_from(capacity).unwrap_or(0),
        file_name,
        change_id: change_id.filter(|c| !c.is_empty()),
    })
}

/// The descriptor file and change ID of the disk backings that CBT supports.
fn backing_file_and_change_id(
    backing: &dyn VirtualDeviceBackingInfoTrait,
) -> Option<(String, Option<String>)> {
    let any = backing.as_any_ref();
    if let Some(b) = any.downcast_ref::<VirtualDiskFlatVer2BackingInfo>() {
        return Some((b.file_name.clone(), b.change_id.clone()));
    }
    if let Some(b) = any.downcast_ref::<VirtualDiskSeSparseBackingInfo>() {
        return Some((b.file_name.clone(), b.change_id.clone()));
    }
    if let Some(b) = any.downcast_ref::<VirtualDiskSparseVer2BackingInfo>() {
        return Some((b.file_name.clone(), b.change_id.clone()));
    }
    if let Some(b) = any.downcast_ref::<VirtualDiskRawDiskMappingVer1BackingInfo>() {
        return Some((b.file_name.clone(), b.change_id.clone()));
    }
    if let Some(b) = any.downcast_ref::<VirtualDiskRawDiskVer2BackingInfo>() {
        return Some((b.descriptor_file_name.clone(), b.change_id.clone()));
    }
    None
}
