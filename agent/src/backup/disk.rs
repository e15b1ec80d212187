//! One disk of the snapshot: full or incremental, its changed areas, the copy to its hub
//! target, the flush, and only then the change ID it reached. Every target disk is copied at
//! once; the first failure's reason is the backup's.

use std::time::Instant;

use sendense_contract::AgentReason;
use sendense_contract::result::DiskReport;
use sendense_vsphere::{Disk, SnapshotRef, VSphere, VSphereError, VmRef};

use super::failure::{Failure, failure_from, vsphere_reason};
use super::plan::BackupPlan;
use super::progress::LiveProgress;
use super::vm::Cbt;
use crate::checksum;
use crate::copy::{ChangedArea, CopyError, CopyKind, Progress, copy_areas, verify_written};
use crate::nbd::{Address, NbdClient, NbdError, NbdUrl};
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("the snapshot's disk has no change ID: changed block tracking is not active")]
    CbtNotActive,
    #[error("hub target {address}: {source}")]
    HubUnreachable {
        address: Address,
        #[source]
        source: NbdError,
    },
    #[error(
        "the hub's image holds {image} bytes but the disk has {capacity}: the disk was resized, take a full backup into a new chain"
    )]
    Resized { image: u64, capacity: u64 },
    #[error("querying changed areas: {0}")]
    ChangedAreas(#[source] VSphereError),
    #[error("opening the snapshot's disk: {0}")]
    OpenSource(#[source] SourceError),
    #[error("snapshot source: {0}")]
    ConnectSource(#[source] NbdError),
    #[error("{0}")]
    Copy(#[source] CopyError),
    #[error("checksum of the snapshot disk: {0}")]
    Checksum(#[source] NbdError),
    #[error("verifying the copy: {0}")]
    Verify(#[source] CopyError),
}

impl DiskError {
    pub fn reason(&self) -> AgentReason {
        match self {
            DiskError::CbtNotActive => AgentReason::CbtNotActive,
            DiskError::HubUnreachable { .. } => AgentReason::HubUnreachable,
            DiskError::Resized { .. } => AgentReason::DiskResized,
            DiskError::Verify(_) => AgentReason::VerificationFailed,
            DiskError::Copy(CopyError::Target {
                source: NbdError::Server { errno: 28, .. },
                ..
            }) => AgentReason::RepositoryFull,
            DiskError::ChangedAreas(e) => vsphere_reason(e, AgentReason::CopyFailed),
            DiskError::OpenSource(_)
            | DiskError::ConnectSource(_)
            | DiskError::Copy(_)
            | DiskError::Checksum(_) => AgentReason::CopyFailed,
        }
    }
}

failure_from!(DiskError);

/// What every disk's copy shares.
pub struct Snapshot<'a> {
    pub vs: &'a VSphere,
    pub plan: &'a BackupPlan,
    pub vm: &'a VmRef,
    pub snapshot: &'a SnapshotRef,
    pub cbt: Cbt,
}

/// Copies every disk of the snapshot that has a target, all at once. Fails when any disk
/// failed, with the first failed disk's reason and every failed disk's error.
pub async fn copy_all(
    s: &Snapshot<'_>,
    disks: Vec<Disk>,
    live: &LiveProgress,
) -> Result<Vec<DiskReport>, Failure> {
    let runs = disks.iter().filter_map(|disk| {
        let target = s.plan.targets.get(&disk.key)?;
        let progress = live.add_disk(disk.key);
        Some(async move {
            let started = Instant::now();
            let mut r = DiskReport {
                key: disk.key,
                label: disk.label.clone(),
                capacity: disk.capacity,
                ..Default::default()
            };
            let copied = copy_disk(s, disk, target, &progress, &mut r).await;
            let reason = copied.err().map(|e| {
                r.error = Some(e.to_string());
                r.change_id_reached = None;
                e.reason()
            });
            r.seconds = started.elapsed().as_secs_f64();
            (r, reason)
        })
    });
    let (reports, reasons): (Vec<DiskReport>, Vec<Option<AgentReason>>) =
        futures::future::join_all(runs).await.into_iter().unzip();
    let failed: Vec<String> = reports
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("disk {}: {e}", r.key)))
        .collect();
    if failed.is_empty() {
        Ok(reports)
    } else {
        Err(Failure::new(
            reasons
                .into_iter()
                .flatten()
                .next()
                .unwrap_or(AgentReason::CopyFailed),
            failed.join("; "),
        ))
    }
}

async fn copy_disk(
    s: &Snapshot<'_>,
    disk: &Disk,
    target_url: &NbdUrl,
    progress: &Progress,
    r: &mut DiskReport,
) -> Result<(), DiskError> {
    let plan = s.plan;
    let reached = disk.change_id.clone().ok_or(DiskError::CbtNotActive)?;
    let target = NbdClient::connect(target_url, &plan.connect)
        .await
        .map_err(|source| DiskError::HubUnreachable {
            address: target_url.address.clone(),
            source,
        })?;
    if target.size() != disk.capacity {
        return Err(DiskError::Resized {
            image: target.size(),
            capacity: disk.capacity,
        });
    }
    let (areas, kind) = changed_areas(s, disk, r).await?;
    r.areas = areas.len();
    r.bytes_to_copy = areas.iter().map(|a| a.length).sum();

    let source = plan
        .reader
        .open(s.vm, crate::source::Access::Snapshot(s.snapshot), disk)
        .await
        .map_err(DiskError::OpenSource)?;
    let src = NbdClient::connect(&source.url(), &plan.connect)
        .await
        .map_err(DiskError::ConnectSource)?;
    let stats = copy_areas(&src, &target, areas, kind, &plan.copy, progress)
        .await
        .map_err(DiskError::Copy)?;
    r.bytes_written = stats.data;
    r.bytes_zeroed = stats.zeroed;
    r.bytes_skipped = stats.skipped;
    if plan.copy.verify {
        // The target is flushed: what the hub now serves is what the image holds.
        let verified = verify_written(&target, &stats.chunks, plan.copy.max_in_flight, progress)
            .await
            .map_err(DiskError::Verify)?;
        r.bytes_verified = Some(verified);
    }
    if plan.checksum {
        let sum = checksum::sha256(&src, plan.copy.request_size, plan.copy.max_in_flight)
            .await
            .map_err(DiskError::Checksum)?;
        r.sha256 = Some(sum);
    }
    src.disconnect().await;
    target.disconnect().await;
    // copy_areas flushed the target: only now is the change ID reached.
    r.change_id_reached = Some(reached);
    Ok(())
}

/// Which areas to copy, and with what zero semantics; the choice and why go into the report.
async fn changed_areas(
    s: &Snapshot<'_>,
    disk: &Disk,
    r: &mut DiskReport,
) -> Result<(Vec<ChangedArea>, CopyKind), DiskError> {
    let base = match s.plan.base_change_ids.get(&disk.key) {
        None => {
            r.copy = Some(CopyKind::Full);
            r.reason = "no previous backup of this disk".into();
            r.change_id_used = "*".into();
            let areas =
                s.vs.changed_areas(s.vm, s.snapshot, disk, "*")
                    .await
                    .map_err(DiskError::ChangedAreas)?;
            return Ok((areas, CopyKind::Full));
        }
        Some(base) => base,
    };
    if s.cbt == Cbt::EnabledNow {
        return Ok(full_over_overlay(
            r,
            base,
            disk,
            "changed block tracking was just enabled, so earlier change IDs mean nothing",
        ));
    }
    match s.vs.changed_areas(s.vm, s.snapshot, disk, base).await {
        Ok(areas) => {
            r.copy = Some(CopyKind::Incremental);
            r.reason = "changes since the previous backup".into();
            r.change_id_used = base.clone();
            Ok((areas, CopyKind::Incremental))
        }
        Err(VSphereError::InvalidChangeId { message, .. }) => Ok(full_over_overlay(
            r,
            base,
            disk,
            &format!("vCenter no longer accepts change ID {base} ({message})"),
        )),
        Err(e) => Err(DiskError::ChangedAreas(e)),
    }
}

/// An incremental target (an overlay on the previous backup) that must receive a full copy:
/// every byte of the disk is written, data or zeros, so nothing of the parent shows through.
fn full_over_overlay(
    r: &mut DiskReport,
    base: &str,
    disk: &Disk,
    why: &str,
) -> (Vec<ChangedArea>, CopyKind) {
    r.copy = Some(CopyKind::Full);
    r.reason = format!("full copy: {why}");
    r.change_id_used = format!("* (instead of {base})");
    (
        vec![ChangedArea {
            start: 0,
            length: disk.capacity,
        }],
        CopyKind::Incremental,
    )
}
