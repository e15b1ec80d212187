//! The recorded plan read back as the inputs of the job's pods: the hub's disks, the agent's
//! targets and the change IDs its incremental disks start from.

use sendense_contract::cli::{BaseChangeId, DiskTarget};
use sendense_crds::BackupJob;
use sendense_crds::backup_job::{CopyKind, DiskStatus};

use crate::resources::HubDisk;

/// The hub's disks as recorded in status, in status order.
pub fn hub_disks(job: &BackupJob) -> Vec<HubDisk> {
    job.status
        .iter()
        .flat_map(|s| s.disks.iter())
        .map(|d| HubDisk {
            key: d.device_key,
            port: d.port.unwrap_or_default(),
            file: d.file.clone().unwrap_or_default(),
            size: d.capacity_bytes.unwrap_or_default().max(0) as u64,
            backing: d.backing_file.clone(),
        })
        .collect()
}

/// Targets of the agent: each disk's export on the hub pod, over TLS, the hub's certificate
/// checked for the name it carries (`nbd_tls::server_name`).
pub fn targets(job: &BackupJob, hub_ip: &str) -> Vec<DiskTarget> {
    let name = crate::nbd_tls::server_name(job);
    by_key(job)
        .map(|d| DiskTarget {
            key: d.device_key,
            url: format!(
                "nbds://{hub_ip}:{}/?tls-hostname={name}",
                d.port.unwrap_or_default()
            ),
        })
        .collect()
}

/// Change IDs the incremental disks start from.
pub fn base_change_ids(job: &BackupJob) -> Vec<BaseChangeId> {
    by_key(job)
        .filter(|d| d.copy == Some(CopyKind::Incremental))
        .filter_map(|d| {
            d.change_id_used.clone().map(|c| BaseChangeId {
                key: d.device_key,
                change_id: c,
            })
        })
        .collect()
}

/// The disks of the recorded plan, in device-key order (as the agent's flags list them).
fn by_key(job: &BackupJob) -> impl Iterator<Item = &DiskStatus> {
    let mut disks: Vec<_> = job.status.iter().flat_map(|s| s.disks.iter()).collect();
    disks.sort_by_key(|d| d.device_key);
    disks.into_iter()
}
