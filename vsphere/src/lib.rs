//! The vSphere client: one logged-in vCenter session over SOAP (vim_rs), with the calls a
//! backup makes: find the VM, make sure CBT is on, take and remove snapshots, read disks and
//! their change IDs, and page through `QueryChangedDiskAreas`.
//!
//! Every request has a deadline (`call_timeout`), every task wait has one (`task_timeout`), an
//! expired session is logged in again once per call, and credentials never appear in logs,
//! errors or `Debug` output.

mod cbt;
mod collector;
mod config;
mod disks;
mod error;
mod inventory;
mod paths;
mod props;
mod session;
mod snapshots;
mod tasks;
mod tls;

pub use cbt::{ChangedArea, DiskChangeInfo};
pub use config::{Tls, VCenterConfig};
pub use disks::Disk;
pub use error::VSphereError;
pub use inventory::{VmInfo, VmRef, VmSelector};
pub use paths::{flat_extent_path, parse_datastore_path};
pub use session::VSphere;
pub use snapshots::{Removal, SnapshotRef};
pub use tls::{sha1_thumbprint, sha256_thumbprint};
