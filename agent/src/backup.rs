//! One backup of one VM: ONE snapshot for all disks, the changed areas of every disk copied to
//! its hub target, the change IDs reached recorded only after the data is flushed, and the
//! snapshot removed on every path — success, failure, deadline or SIGTERM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use sendense_contract::AgentReason;
use sendense_contract::progress::{DiskProgress, ProgressReport, Stage};
use sendense_contract::result::{BackupResult, DiskReport, SnapshotReport};

use crate::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};
use crate::source::Transport;
use crate::verify;
use sendense_vsphere::{Disk, SnapshotRef, VSphere, VSphereError, VmRef, VmSelector};

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

/// What a failed step was, for `BackupResult::reason`, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: AgentReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: AgentReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// A vSphere error of a step whose own failures are `otherwise`: connectivity, trust and
    /// login problems keep their own reason wherever they happen.
    pub fn vsphere(err: &VSphereError, otherwise: AgentReason, message: String) -> Self {
        Self::new(vsphere_reason(err, otherwise), message)
    }
}

/// The condition reason of a vSphere error met in a step whose own failures are `otherwise`.
pub fn vsphere_reason(err: &VSphereError, otherwise: AgentReason) -> AgentReason {
    match err {
        VSphereError::Transport(_) => AgentReason::Unreachable,
        VSphereError::Tls(_) => AgentReason::TlsVerificationFailed,
        VSphereError::Login(_) => AgentReason::LoginFailed,
        VSphereError::Timeout { .. } => AgentReason::Timeout,
        _ => otherwise,
    }
}

/// Live progress of all disks, for the progress reporter and the status endpoint.
#[derive(Default)]
pub struct LiveProgress {
    pub disks: std::sync::Mutex<BTreeMap<i32, Arc<Progress>>>,
    stage: std::sync::Mutex<Stage>,
}

impl LiveProgress {
    pub fn stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_stage(&self, stage: Stage) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage;
    }

    /// The stage and every disk's counters, read now.
    pub fn report(&self) -> ProgressReport {
        let disks: Vec<DiskProgress> = self
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(key, p)| DiskProgress {
                key: *key,
                bytes_to_copy: p.total.load(Ordering::Relaxed),
                bytes_copied: p.done.load(Ordering::Relaxed),
            })
            .collect();
        ProgressReport {
            stage: self.stage(),
            bytes_to_copy: disks.iter().map(|d| d.bytes_to_copy).sum(),
            bytes_copied: disks.iter().map(|d| d.bytes_copied).sum(),
            disks,
        }
    }

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
    if let Err(f) = prepare_and_copy(vs, plan, live, &mut result, stop).await {
        result.error = Some(f.message);
        result.reason = Some(f.reason);
    }
    result.ok = result.error.is_none()
        && result
            .disks
            .iter()
            .all(|d| d.error.is_none() && d.change_id_reached.is_some())
        && result.snapshot.as_ref().is_some_and(|s| s.removed);
    if !result.ok && result.reason.is_none() {
        // Not reached today (every failure path sets an error); a failed result always says why.
        result.reason = Some(AgentReason::CopyFailed);
        result
            .error
            .get_or_insert_with(|| "a disk was not copied completely".into());
    }
    live.set_stage(Stage::Done);
    result
}

async fn prepare_and_copy(
    vs: &VSphere,
    plan: &BackupPlan,
    live: &LiveProgress,
    result: &mut BackupResult,
    stop: impl std::future::Future<Output = String>,
) -> Result<(), Failure> {
    live.set_stage(Stage::Connecting);
    let vm = vs
        .find_vm(&plan.datacenter, &plan.vm)
        .await
        .map_err(|e| match &e {
            VSphereError::Fault { fault, .. } if fault == "DuplicateName" => {
                Failure::new(AgentReason::VmNameNotUnique, e.to_string())
            }
            _ => Failure::vsphere(&e, AgentReason::VmNotFound, e.to_string()),
        })?;
    result.vm = Some(vm.name.clone());
    result.vm_moref = Some(vm.moref.clone());
    result.instance_uuid = Some(vm.instance_uuid.clone());
    let info = vs.vm_info(&vm).await.map_err(|e| {
        Failure::vsphere(
            &e,
            AgentReason::VmNotFound,
            format!("reading VM {}'s configuration: {e}", vm.name),
        )
    })?;
    let known: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
    for key in plan.targets.keys() {
        if !known.contains(key) {
            return Err(Failure::new(
                AgentReason::DiskNotFound,
                format!(
                    "VM {} has no disk with device key {key} (its disks: {known:?})",
                    vm.name
                ),
            ));
        }
    }
    if !info.cbt_enabled {
        info!(vm = %vm.name, "enabling changed block tracking");
        vs.enable_cbt(&vm).await.map_err(|e| {
            Failure::vsphere(
                &e,
                AgentReason::CbtEnableFailed,
                format!("enabling changed block tracking: {e}"),
            )
        })?;
        result.cbt_enabled_now = true;
    }
    live.set_stage(Stage::Snapshot);
    let leftovers = vs
        .remove_snapshots_with_prefix(&vm, &plan.snapshot_prefix)
        .await
        .map_err(|e| {
            Failure::vsphere(
                &e,
                AgentReason::SnapshotFailed,
                format!(
                    "removing leftover {}* snapshots before a new one: {e}",
                    plan.snapshot_prefix
                ),
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
        .map_err(|e| {
            Failure::vsphere(
                &e,
                AgentReason::SnapshotFailed,
                format!("creating snapshot {name}: {e}"),
            )
        })?;
    info!(vm = %vm.name, snapshot = %snapshot.moref, "snapshot created");
    result.snapshot = Some(SnapshotReport {
        id: snapshot.moref.clone(),
        name: snapshot.name.clone(),
        ..Default::default()
    });

    // Everything between creating and removing the snapshot; whatever happens in it, the
    // snapshot is removed below.
    live.set_stage(Stage::Copying);
    let copied = tokio::select! {
        r = copy_all(vs, plan, live, &vm, &snapshot, result.cbt_enabled_now) => r,
        why = stop => Err(Failure::new(AgentReason::Stopped, format!("stopped before the copy finished: {why}"))),
    };
    live.set_stage(Stage::RemovingSnapshot);
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
        Failure::new(
            AgentReason::SnapshotRemovalFailed,
            format!(
                "the data was copied, but snapshot {} could not be removed: {e}",
                snapshot.moref
            ),
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
) -> Result<Vec<DiskReport>, Failure> {
    let disks = vs.snapshot_disks(snapshot).await.map_err(|e| {
        Failure::vsphere(
            &e,
            AgentReason::SnapshotFailed,
            format!("reading the snapshot's disks: {e}"),
        )
    })?;
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
            let mut r = DiskReport {
                key: disk.key,
                label: disk.label.clone(),
                capacity: disk.capacity,
                ..Default::default()
            };
            let mut reason = None;
            if let Err(f) = copy_disk(
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
                r.error = Some(f.message);
                r.change_id_reached = None;
                reason = Some(f.reason);
            }
            r.seconds = started.elapsed().as_secs_f64();
            (r, reason)
        }
    });
    let (results, reasons): (Vec<DiskReport>, Vec<Option<AgentReason>>) =
        futures::future::join_all(runs).await.into_iter().unzip();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("disk {}: {e}", r.key)))
        .collect();
    if failed.is_empty() {
        Ok(results)
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

#[allow(clippy::too_many_arguments)]
async fn copy_disk(
    vs: &VSphere,
    plan: &BackupPlan,
    vm: &VmRef,
    snapshot: &SnapshotRef,
    disk: &Disk,
    cbt_just_enabled: bool,
    progress: &Progress,
    r: &mut DiskReport,
) -> Result<(), Failure> {
    let copy_failed = |e: String| Failure::new(AgentReason::CopyFailed, e);
    let reached = disk.change_id.clone().ok_or_else(|| {
        Failure::new(
            AgentReason::CbtNotActive,
            "the snapshot's disk has no change ID: changed block tracking is not active",
        )
    })?;
    let target_url = &plan.targets[&disk.key];
    let target = NbdClient::connect(target_url, &plan.connect)
        .await
        .map_err(|e| {
            Failure::new(
                AgentReason::HubUnreachable,
                format!("hub target {}: {e}", target_url.address),
            )
        })?;
    if target.size() != disk.capacity {
        return Err(Failure::new(
            AgentReason::DiskResized,
            format!(
                "the hub's image holds {} bytes but the disk has {}: the disk was resized, take a full backup into a new chain",
                target.size(),
                disk.capacity
            ),
        ));
    }
    let areas_failed = |e: VSphereError| {
        Failure::vsphere(
            &e,
            AgentReason::CopyFailed,
            format!("querying changed areas: {e}"),
        )
    };

    // Which areas, and with what zero semantics.
    let (areas, kind) = match plan.base_change_ids.get(&disk.key) {
        None => {
            r.copy = Some(CopyKind::Full);
            r.reason = "no previous backup of this disk".into();
            r.change_id_used = "*".into();
            (
                vs.changed_areas(vm, snapshot, disk, "*")
                    .await
                    .map_err(areas_failed)?,
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
                r.copy = Some(CopyKind::Incremental);
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
            Err(e) => return Err(areas_failed(e)),
        },
    };
    r.areas = areas.len();
    r.bytes_to_copy = areas.iter().map(|a| a.length).sum();

    let source = plan
        .transport
        .open(vm, snapshot, disk)
        .await
        .map_err(|e| copy_failed(format!("opening the snapshot's disk: {e}")))?;
    let src = NbdClient::connect(&source.url(), &plan.connect)
        .await
        .map_err(|e| copy_failed(format!("snapshot source: {e}")))?;
    let stats = copy_areas(&src, &target, areas, kind, &plan.copy, progress)
        .await
        .map_err(|e| copy_failed(e.to_string()))?;
    r.bytes_written = stats.data;
    r.bytes_zeroed = stats.zeroed;
    r.bytes_skipped = stats.skipped;
    if plan.checksum {
        r.sha256 = Some(
            verify::sha256(&src, plan.copy.request_size, plan.copy.max_in_flight)
                .await
                .map_err(|e| copy_failed(format!("checksum of the snapshot disk: {e}")))?,
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
