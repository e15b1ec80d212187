//! One backup of one VM: ONE snapshot for all disks, the changed areas of every disk copied to
//! its hub target, the change IDs reached recorded only after the data is flushed, and the
//! snapshot removed on every path — success, failure, deadline or SIGTERM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};
use crate::source::Transport;
use crate::verify;
use crate::vsphere::{Disk, SnapshotRef, VSphere, VSphereError, VmRef, VmSelector};

/// What to back up and where to.
#[derive(Debug, Clone)]
pub struct BackupPlan {
    pub datacenter: String,
    pub vm: VmSelector,
    /// Device key -> hub export for that disk. Only these disks are backed up.
    pub targets: BTreeMap<i32, NbdUrl>,
    /// Device key -> change ID of the previous backup of that disk (absent: full copy).
    pub base_change_ids: BTreeMap<i32, String>,
    pub transport: Transport,
    pub snapshot_prefix: String,
    /// Name of this backup (goes into the snapshot name and description).
    pub job: String,
    pub quiesce: bool,
    pub copy: CopyOptions,
    pub connect: ConnectOptions,
    /// Also hash each disk as read from the snapshot, for verifying the restore point.
    pub checksum: bool,
}

/// How one disk went.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskResult {
    pub key: i32,
    pub label: String,
    pub capacity: u64,
    /// "full" or "incremental".
    pub copy: String,
    /// Why this kind of copy.
    pub reason: String,
    pub change_id_used: String,
    /// Set only once the disk's data is flushed on the target.
    pub change_id_reached: Option<String>,
    pub areas: usize,
    pub bytes_to_copy: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub seconds: f64,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SnapshotResult {
    pub id: String,
    pub name: String,
    pub removed: bool,
    pub removal_error: Option<String>,
}

/// The machine-readable result the agent prints.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackupResult {
    pub ok: bool,
    pub vm: Option<String>,
    pub vm_moref: Option<String>,
    pub instance_uuid: Option<String>,
    pub cbt_enabled_now: bool,
    pub leftover_snapshots_removed: Vec<String>,
    pub snapshot: Option<SnapshotResult>,
    pub disks: Vec<DiskResult>,
    pub error: Option<String>,
}

/// Live progress of all disks, for the progress reporter.
#[derive(Default)]
pub struct LiveProgress {
    pub disks: std::sync::Mutex<BTreeMap<i32, Arc<Progress>>>,
}

impl LiveProgress {
    pub fn totals(&self) -> (u64, u64) {
        let d = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        d.values().fold((0, 0), |(done, total), p| {
            (
                done + p.done.load(Ordering::Relaxed),
                total + p.total.load(Ordering::Relaxed),
            )
        })
    }
}

/// Runs the backup. `stop` resolves when the agent must stop early (deadline, SIGTERM): the
/// copy is abandoned, the snapshot still removed.
pub async fn run(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    stop: impl std::future::Future<Output = String>,
) -> BackupResult {
    let mut result = BackupResult::default();
    if let Err(e) = prepare_and_copy(vs, plan, live, &mut result, stop).await {
        result.error = Some(e);
    }
    result.ok = result.error.is_none()
        && result
            .disks
            .iter()
            .all(|d| d.error.is_none() && d.change_id_reached.is_some())
        && result.snapshot.as_ref().is_some_and(|s| s.removed);
    result
}

async fn prepare_and_copy(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    result: &mut BackupResult,
    stop: impl std::future::Future<Output = String>,
) -> Result<(), String> {
    let vm = vs
        .find_vm(&plan.datacenter, &plan.vm)
        .await
        .map_err(|e| e.to_string())?;
    result.vm = Some(vm.name.clone());
    result.vm_moref = Some(vm.moref.clone());
    result.instance_uuid = Some(vm.instance_uuid.clone());
    let info = vs.vm_info(&vm).await.map_err(|e| e.to_string())?;
    let known: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
    for key in plan.targets.keys() {
        if !known.contains(key) {
            return Err(format!(
                "VM {} has no disk with device key {key} (its disks: {known:?})",
                vm.name
            ));
        }
    }
    if !info.cbt_enabled {
        info!(vm = %vm.name, "enabling changed block tracking");
        vs.enable_cbt(&vm).await.map_err(|e| e.to_string())?;
        result.cbt_enabled_now = true;
    }
    let leftovers = vs
        .remove_snapshots_with_prefix(&vm, &plan.snapshot_prefix)
        .await
        .map_err(|e| {
            format!(
                "removing leftover {}* snapshots before a new one: {e}",
                plan.snapshot_prefix
            )
        })?;
    result.leftover_snapshots_removed = leftovers.iter().map(|s| s.name.clone()).collect();

    let name = format!("{}{}", plan.snapshot_prefix, plan.job);
    let snapshot = vs
        .create_snapshot(
            &vm,
            &name,
            &format!("Sendense backup {}; removed when the backup ends", plan.job),
            plan.quiesce,
        )
        .await
        .map_err(|e| format!("creating snapshot {name}: {e}"))?;
    info!(vm = %vm.name, snapshot = %snapshot.moref, "snapshot created");
    result.snapshot = Some(SnapshotResult {
        id: snapshot.moref.clone(),
        name: snapshot.name.clone(),
        ..Default::default()
    });

    // Everything between creating and removing the snapshot; whatever happens in it, the
    // snapshot is removed below.
    let copied = tokio::select! {
        r = copy_all(vs, plan, live, &vm, &snapshot, result.cbt_enabled_now) => r,
        why = stop => Err(format!("stopped before the copy finished: {why}")),
    };
    let removal = remove_snapshot(vs, &snapshot).await;
    if let Some(s) = result.snapshot.as_mut() {
        s.removed = removal.is_ok();
        s.removal_error = removal.as_ref().err().cloned();
    }
    match copied {
        Ok(disks) => result.disks = disks,
        Err(e) => return Err(e),
    }
    removal.map_err(|e| {
        format!(
            "the data was copied, but snapshot {} could not be removed: {e}",
            snapshot.moref
        )
    })
}

/// Removal gets its own attempts: a snapshot left behind grows on the datastore.
async fn remove_snapshot(vs: &VSphere, snapshot: &SnapshotRef) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=3 {
        match vs.remove_snapshot(snapshot).await {
            Ok(()) => {
                info!(snapshot = %snapshot.moref, "snapshot removed");
                return Ok(());
            }
            Err(VSphereError::NotFound(_)) => return Ok(()),
            Err(e) => {
                warn!(snapshot = %snapshot.moref, attempt, "removing snapshot: {e}");
                last = e.to_string();
                tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
            }
        }
    }
    Err(last)
}

async fn copy_all(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    vm: &VmRef,
    snapshot: &SnapshotRef,
    cbt_just_enabled: bool,
) -> Result<Vec<DiskResult>, String> {
    let disks = vs
        .snapshot_disks(snapshot)
        .await
        .map_err(|e| format!("reading the snapshot's disks: {e}"))?;
    let selected: Vec<Disk> = disks
        .into_iter()
        .filter(|d| plan.targets.contains_key(&d.key))
        .collect();
    let runs = selected.iter().map(|disk| {
        let progress = Arc::new(Progress::default());
        live.disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(disk.key, progress.clone());
        async move {
            let started = Instant::now();
            let mut r = DiskResult {
                key: disk.key,
                label: disk.label.clone(),
                capacity: disk.capacity,
                ..Default::default()
            };
            if let Err(e) = copy_disk(
                vs,
                plan,
                vm,
                snapshot,
                disk,
                cbt_just_enabled,
                &progress,
                &mut r,
            )
            .await
            {
                r.error = Some(e);
                r.change_id_reached = None;
            }
            r.seconds = started.elapsed().as_secs_f64();
            r
        }
    });
    let results = futures::future::join_all(runs).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("disk {}: {e}", r.key)))
        .collect();
    if failed.is_empty() {
        Ok(results)
    } else {
        Err(failed.join("; "))
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_disk(
    vs: &VSphere,
    plan: &BackupPlan,
    vm: &VmRef,
    snapshot: &SnapshotRef,
    disk: &Disk,
    cbt_just_enabled: bool,
    progress: &Progress,
    r: &mut DiskResult,
) -> Result<(), String> {
    let reached = disk.change_id.clone().ok_or_else(|| {
        "the snapshot's disk has no change ID: changed block tracking is not active".to_string()
    })?;
    let target_url = &plan.targets[&disk.key];
    let target = NbdClient::connect(target_url, &plan.connect)
        .await
        .map_err(|e| format!("hub target {}: {e}", target_url.address))?;
    if target.size() != disk.capacity {
        return Err(format!(
            "the hub's image holds {} bytes but the disk has {}: the disk was resized, take a full backup into a new chain",
            target.size(),
            disk.capacity
        ));
    }

    // Which areas, and with what zero semantics.
    let (areas, kind) = match plan.base_change_ids.get(&disk.key) {
        None => {
            r.copy = "full".into();
            r.reason = "no previous backup of this disk".into();
            r.change_id_used = "*".into();
            (
                vs.changed_areas(vm, snapshot, disk, "*")
                    .await
                    .map_err(|e| e.to_string())?,
                CopyKind::Full,
            )
        }
        Some(base) if cbt_just_enabled => full_over_overlay(
            r,
            base,
            disk,
            "changed block tracking was just enabled, so earlier change IDs mean nothing",
        ),
        Some(base) => match vs.changed_areas(vm, snapshot, disk, base).await {
            Ok(areas) => {
                r.copy = "incremental".into();
                r.reason = "changes since the previous backup".into();
                r.change_id_used = base.clone();
                (areas, CopyKind::Incremental)
            }
            Err(VSphereError::InvalidChangeId { message, .. }) => full_over_overlay(
                r,
                base,
                disk,
                &format!("vCenter no longer accepts change ID {base} ({message})"),
            ),
            Err(e) => return Err(e.to_string()),
        },
    };
    r.areas = areas.len();
    r.bytes_to_copy = areas.iter().map(|a| a.length).sum();

    let source = plan
        .transport
        .open(vm, snapshot, disk)
        .await
        .map_err(|e| e.to_string())?;
    let src = NbdClient::connect(&source.url(), &plan.connect)
        .await
        .map_err(|e| format!("snapshot source: {e}"))?;
    let stats = copy_areas(&src, &target, areas, kind, &plan.copy, progress)
        .await
        .map_err(|e| e.to_string())?;
    r.bytes_written = stats.data;
    r.bytes_zeroed = stats.zeroed;
    r.bytes_skipped = stats.skipped;
    if plan.checksum {
        r.sha256 = Some(
            verify::sha256(&src, plan.copy.request_size, plan.copy.max_in_flight)
                .await
                .map_err(|e| format!("checksum of the snapshot disk: {e}"))?,
        );
    }
    src.disconnect().await;
    target.disconnect().await;
    // copy_areas flushed the target: only now is the change ID reached.
    r.change_id_reached = Some(reached);
    Ok(())
}

/// An incremental target (an overlay on the previous backup) that must receive a full copy:
/// every byte of the disk is written, data or zeros, so nothing of the parent shows through.
fn full_over_overlay(
    r: &mut DiskResult,
    base: &str,
    disk: &Disk,
    why: &str,
) -> (Vec<ChangedArea>, CopyKind) {
    r.copy = "full".into();
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
