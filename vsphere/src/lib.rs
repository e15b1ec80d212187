//! The vSphere client: one logged-in vCenter session over SOAP (vim_rs), with the calls a
//! backup makes: find the VM, make sure CBT is on, take and remove snapshots, read disks and
//! their change IDs, and page through `QueryChangedDiskAreas`; and for restores, read a VM's
//! state, create VMs with new disks, destroy them and reset CBT; for backup schedules, every VM
//! of a datacenter with its folder and custom attributes.
//!
//! Every request has a deadline (`call_timeout`), every task wait has one (`task_timeout`), an
//! expired session is logged in again once per call, and credentials never appear in logs,
//! errors or `Debug` output.

mod attributes;
mod cbt;
mod collector;
mod config;
mod disks;
mod error;
mod glob;
mod inventory;
mod listing;
mod paths;
mod props;
mod session;
mod snapshots;
mod tasks;
mod tls;
mod vms;

pub use cbt::{ChangedArea, DiskChangeInfo};
pub use config::{Tls, VCenterConfig};
pub use disks::Disk;
pub use error::VSphereError;
pub use glob::glob_match;
pub use inventory::{VmInfo, VmRef, VmSelector};
pub use listing::VmListing;
pub use paths::{flat_extent_path, parse_datastore_path};
pub use session::VSphere;
pub use snapshots::{Removal, SnapshotRef};
pub use tls::{sha1_thumbprint, sha256_thumbprint};
pub use vms::{Hardware, NewVm, PowerState, VmState};

/// Whether a log line of `target` at `level` may be written, whatever `RUST_LOG` asks for:
/// vim_rs' client logs the user name at debug once logged in ("SOAP session created for:
/// ..."), and with a Secret's keys swapped that is the password. Its lines below info go.
pub fn may_log(target: &str, level: &tracing::Level) -> bool {
    let vim_client =
        target == "vim_rs::core::client" || target.starts_with("vim_rs::core::client::");
    !(vim_client && *level > tracing::Level::INFO)
}

#[cfg(test)]
mod log_tests {
    use super::may_log;
    use tracing::Level;

    #[test]
    fn vim_rs_client_lines_below_info_are_never_logged() {
        assert!(!may_log("vim_rs::core::client", &Level::DEBUG));
        assert!(!may_log("vim_rs::core::client", &Level::TRACE));
        assert!(may_log("vim_rs::core::client", &Level::INFO));
        assert!(may_log("vim_rs::core::client", &Level::WARN));
        assert!(may_log("vim_rs::core::client_ext", &Level::DEBUG));
        assert!(may_log("vim_rs::wire::soap", &Level::DEBUG));
        assert!(may_log("sendense_vsphere::session", &Level::TRACE));
    }
}
