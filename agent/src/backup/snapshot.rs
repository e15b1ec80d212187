//! The backup's one snapshot: leftovers of earlier attempts removed first, the snapshot taken,
//! its disks read, and its removal retried, because a snapshot left behind grows on the
//! datastore.

use std::time::Duration;

use tracing::{info, warn};

use sendense_contract::AgentReason;
use sendense_vsphere::{Disk, SnapshotRef, VSphere, VSphereError, VmRef};

use super::failure::{Failure, failure_from, vsphere_reason};

/// Attempts at removing the snapshot; the wait after attempt n is 2n seconds.
const REMOVAL_ATTEMPTS: u64 = 3;

/// The most the agent spends removing its snapshot at the end of a backup.
pub const REMOVAL_BUDGET: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("removing leftover {prefix}* snapshots before a new one: {source}")]
    Leftovers {
        prefix: String,
        #[source]
        source: VSphereError,
    },
    #[error("creating snapshot {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: VSphereError,
    },
    #[error("reading the snapshot's disks: {0}")]
    Disks(#[source] VSphereError),
}

impl SnapshotError {
    pub fn reason(&self) -> AgentReason {
        match self {
            SnapshotError::Leftovers { source, .. }
            | SnapshotError::Create { source, .. }
            | SnapshotError::Disks(source) => vsphere_reason(source, AgentReason::SnapshotFailed),
        }
    }
}

failure_from!(SnapshotError);

/// Removes snapshots named `<prefix>*` (left by attempts that could not clean up); their names.
/// Only jobs that no longer run left them: the operator starts a backup only while its job holds
/// the VM's Lease, so no other backup of this VM runs now (one backup per VM, cluster-wide).
pub async fn remove_leftovers(
    vs: &VSphere,
    vm: &VmRef,
    prefix: &str,
) -> Result<Vec<String>, SnapshotError> {
    let removed = vs
        .remove_snapshots_with_prefix(vm, prefix)
        .await
        .map_err(|source| SnapshotError::Leftovers {
            prefix: prefix.to_owned(),
            source,
        })?;
    Ok(removed.into_iter().map(|s| s.name).collect())
}

/// The snapshot's name: `<prefix><job>`, then `-<first 8 characters of the job's UID>`.
pub fn name(prefix: &str, job: &str, job_uid: Option<&str>) -> String {
    match job_uid {
        Some(uid) => format!("{prefix}{job}-{}", uid.chars().take(8).collect::<String>()),
        None => format!("{prefix}{job}"),
    }
}

/// Takes the backup's snapshot (`name`), its description naming the job and its UID.
pub async fn create(
    vs: &VSphere,
    vm: &VmRef,
    prefix: &str,
    job: &str,
    job_uid: Option<&str>,
    quiesce: bool,
) -> Result<SnapshotRef, SnapshotError> {
    let name = name(prefix, job, job_uid);
    let description = match job_uid {
        Some(uid) => {
            format!("Sendense backup {job} (BackupJob UID {uid}); removed when the backup ends")
        }
        None => format!("Sendense backup {job}; removed when the backup ends"),
    };
    let snapshot = vs
        .create_snapshot(vm, &name, &description, quiesce)
        .await
        .map_err(|source| SnapshotError::Create { name, source })?;
    info!(vm = %vm.name, snapshot = %snapshot.moref, "snapshot created");
    Ok(snapshot)
}

pub async fn disks(vs: &VSphere, snapshot: &SnapshotRef) -> Result<Vec<Disk>, SnapshotError> {
    vs.snapshot_disks(snapshot)
        .await
        .map_err(SnapshotError::Disks)
}

/// Removes the snapshot (one already gone is fine, so every attempt is safe to repeat), with
/// its own attempts, all within `budget`; the last error. The agent does not wait longer for an
/// unresponsive vCenter: the copy is complete, and the operator keeps hunting the snapshot.
pub async fn remove(
    vs: &VSphere,
    vm: &VmRef,
    snapshot: &SnapshotRef,
    budget: Duration,
) -> Result<(), VSphereError> {
    let attempts = async {
        let mut attempt = 1;
        loop {
            match vs.ensure_snapshot_removed(vm, snapshot).await {
                Ok(how) => {
                    info!(snapshot = %snapshot.moref, ?how, "snapshot removed");
                    return Ok(());
                }
                Err(e) => {
                    warn!(snapshot = %snapshot.moref, attempt, "removing snapshot: {e}");
                    if attempt == REMOVAL_ATTEMPTS {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
                    attempt += 1;
                }
            }
        }
    };
    match tokio::time::timeout(budget, attempts).await {
        Ok(r) => r,
        Err(_) => Err(VSphereError::Timeout {
            what: format!("removing snapshot {:?} ({})", snapshot.name, snapshot.moref),
            after: budget,
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_snapshot_carries_its_jobs_uid() {
        assert_eq!(
            super::name(
                "sendense-",
                "nightly",
                Some("8f14e45f-ceea-4c8a-9b1c-3a0b5e0d1c2a")
            ),
            "sendense-nightly-8f14e45f"
        );
        assert_eq!(
            super::name("sendense-", "nightly", None),
            "sendense-nightly"
        );
    }
}
