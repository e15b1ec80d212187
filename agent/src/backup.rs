//! One backup of one VM: ONE snapshot for all disks, the changed areas of every disk copied to
//! its hub target, the change IDs reached recorded only after the data is flushed, and the
//! snapshot removed on every path — success, failure, deadline or SIGTERM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// When not ok: a stable CamelCase label of what went wrong (a condition reason), e.g.
    /// `LoginFailed`, `VMNotFound`, `CopyFailed`, `Stopped`, `SnapshotRemovalFailed`.
    pub reason: Option<String>,
    pub vm: Option<String>,
    pub vm_moref: Option<String>,
    pub instance_uuid: Option<String>,
    pub cbt_enabled_now: bool,
    pub leftover_snapshots_removed: Vec<String>,
    pub snapshot: Option<SnapshotResult>,
    pub disks: Vec<DiskResult>,
    pub error: Option<String>,
}

/// What a failed step was, for `BackupResult::reason`, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// A vSphere error of a step whose own failures are `otherwise`: connectivity, trust and
    /// login problems keep their own reason wherever they happen.
    pub fn vsphere(err: &VSphereError, otherwise: &'static str, message: String) -> Self {
        Self::new(vsphere_reason(err, otherwise), message)
    }
}

/// The condition reason of a vSphere error met in a step whose own failures are `otherwise`.
pub fn vsphere_reason(err: &VSphereError, otherwise: &'static str) -> &'static str {
    match err {
        VSphereError::Transport(_) => "Unreachable",
        VSphereError::Tls(_) | VSphereError::Login(_) | VSphereError::Timeout { .. } => {
            err.reason()
        }
        _ => otherwise,
    }
}

/// Where a backup is; served by the status endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Connecting to vCenter, finding the VM, checking its disks and CBT.
    Connecting = 0,
    /// Removing leftover snapshots and taking the backup's snapshot.
    Snapshot = 1,
    Copying = 2,
    RemovingSnapshot = 3,
    /// Finished, whatever the outcome.
    Done = 4,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connecting => "connecting",
            Stage::Snapshot => "snapshot",
            Stage::Copying => "copying",
            Stage::RemovingSnapshot => "removing-snapshot",
            Stage::Done => "done",
        }
    }

    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Connecting,
            1 => Stage::Snapshot,
            2 => Stage::Copying,
            3 => Stage::RemovingSnapshot,
            _ => Stage::Done,
        }
    }
}

/// Live progress of all disks, for the progress reporter and the status endpoint.
#[derive(Default)]
pub struct LiveProgress {
    pub disks: std::sync::Mutex<BTreeMap<i32, Arc<Progress>>>,
    stage: AtomicU8,
}

/// One disk in a `ProgressReport`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiskProgress {
    pub key: i32,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
}

/// What `GET /progress` answers (camelCase: it goes into Kubernetes status as it is).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    pub stage: &'static str,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
    pub disks: Vec<DiskProgress>,
}

impl LiveProgress {
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Relaxed))
    }

    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Relaxed);
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
            stage: self.stage().as_str(),
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
        result.reason = Some(f.reason.to_string());
    }
    result.ok = result.error.is_none()
        && result
            .disks
            .iter()
            .all(|d| d.error.is_none() && d.change_id_reached.is_some())
        && result.snapshot.as_ref().is_some_and(|s| s.removed);
    if !result.ok && result.reason.is_none() {
        // Not reached today (every failure path sets an error); a failed result always says why.
        result.reason = Some("CopyFailed".into());
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
                Failure::new("VMNameNotUnique", e.to_string())
            }
            _ => Failure::vsphere(&e, "VMNotFound", e.to_string()),
        })?;
    result.vm = Some(vm.name.clone());
    result.vm_moref = Some(vm.moref.clone());
    result.instance_uuid = Some(vm.instance_uuid.clone());
    let info = vs.vm_info(&vm).await.map_err(|e| {
        Failure::vsphere(
            &e,
            "VMNotFound",
            format!("reading VM {}'s configuration: {e}", vm.name),
        )
    })?;
    let known: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
    for key in plan.targets.keys() {
        if !known.contains(key) {
            return Err(Failure::new(
                "DiskNotFound",
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
                "CBTEnableFailed",
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
                "SnapshotFailed",
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
                "SnapshotFailed",
                format!("creating snapshot {name}: {e}"),
            )
        })?;
    info!(vm = %vm.name, snapshot = %snapshot.moref, "snapshot created");
    result.snapshot = Some(SnapshotResult {
        id: snapshot.moref.clone(),
        name: snapshot.name.clone(),
        ..Default::default()
    });

    // Everything between creating and removing the snapshot; whatever happens in it, the
    // snapshot is removed below.
    live.set_stage(Stage::Copying);
    let copied = tokio::select! {
        r = copy_all(vs, plan, live, &vm, &snapshot, result.cbt_enabled_now) => r,
        why = stop => Err(Failure::new("Stopped", format!("stopped before the copy finished: {why}"))),
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
            "SnapshotRemovalFailed",
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
) -> Result<Vec<DiskResult>, Failure> {
    let disks = vs.snapshot_disks(snapshot).await.map_err(|e| {
        Failure::vsphere(
            &e,
            "SnapshotFailed",
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
            let mut r = DiskResult {
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
    let (results, reasons): (Vec<DiskResult>, Vec<Option<&'static str>>) =
        futures::future::join_all(runs).await.into_iter().unzip();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("disk {}: {e}", r.key)))
        .collect();
    if failed.is_empty() {
        Ok(results)
    } else {
        Err(Failure::new(
            reasons.into_iter().flatten().next().unwrap_or("CopyFailed"),
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
    r: &mut DiskResult,
) -> Result<(), Failure> {
    let copy_failed = |e: String| Failure::new("CopyFailed", e);
    let reached = disk.change_id.clone().ok_or_else(|| {
        Failure::new(
            "CBTNotActive",
            "the snapshot's disk has no change ID: changed block tracking is not active",
        )
    })?;
    let target_url = &plan.targets[&disk.key];
    let target = NbdClient::connect(target_url, &plan.connect)
        .await
        .map_err(|e| {
            Failure::new(
                "HubUnreachable",
                format!("hub target {}: {e}", target_url.address),
            )
        })?;
    if target.size() != disk.capacity {
        return Err(Failure::new(
            "DiskResized",
            format!(
                "the hub's image holds {} bytes but the disk has {}: the disk was resized, take a full backup into a new chain",
                target.size(),
                disk.capacity
            ),
        ));
    }
    let areas_failed = |e: VSphereError| {
        Failure::vsphere(&e, "CopyFailed", format!("querying changed areas: {e}"))
    };

    // Which areas, and with what zero semantics.
    let (areas, kind) = match plan.base_change_ids.get(&disk.key) {
        None => {
            r.copy = "full".into();
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

/// The most a Kubernetes termination message holds; the kubelet truncates longer ones.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// `result` as JSON of at most `limit` bytes, for a termination message. When the whole result
/// does not fit, it is shrunk step by step, least useful first, and gets `"truncated": true`:
/// per-disk checksums and labels go, then long texts are shortened (never change IDs), then
/// disks keep only their essential fields, then only key and reached change ID, then the disks
/// and leftover snapshot names go. `ok`, `reason` and the start of `error` always stay.
pub fn compact_json(result: &BackupResult, limit: usize) -> String {
    use serde_json::{Value, json};
    let full = serde_json::to_string(result).unwrap_or_default();
    if full.len() <= limit {
        return full;
    }
    let mut v = serde_json::to_value(result).unwrap_or_else(|_| json!({}));
    v["truncated"] = Value::Bool(true);
    let fits = |v: &Value| Some(v.to_string()).filter(|s| s.len() <= limit);
    let disks = |v: &mut Value| -> Vec<serde_json::Map<String, Value>> {
        match v.get_mut("disks").map(Value::take) {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|d| match d {
                    Value::Object(o) => Some(o),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let keep_disks = |v: &mut Value, keep: &[&str], text: usize| {
        let shrunk: Vec<Value> = disks(v)
            .into_iter()
            .map(|mut d| {
                d.retain(|k, _| keep.contains(&k.as_str()));
                for k in ["error", "reason"] {
                    if let Some(s) = d.get_mut(k) {
                        shorten(s, text);
                    }
                }
                Value::Object(d)
            })
            .collect();
        v["disks"] = Value::Array(shrunk);
    };
    let shorten_top = |v: &mut Value, error: usize, other: usize| {
        let texts = |v: &mut Value, keys: &[&str], max: usize| {
            for k in keys {
                if let Some(s) = v.get_mut(*k) {
                    shorten(s, max);
                }
            }
        };
        texts(v, &["error"], error);
        texts(v, &["vm", "vm_moref", "instance_uuid"], other);
        if let Some(s) = v.get_mut("snapshot") {
            texts(s, &["id", "name", "removal_error"], other);
        }
        if let Some(Value::Array(names)) = v.get_mut("leftover_snapshots_removed") {
            names.truncate(8);
            names.iter_mut().for_each(|n| shorten(n, other.min(128)));
        }
    };

    const ALL: &[&str] = &[
        "key",
        "capacity",
        "copy",
        "reason",
        "change_id_used",
        "change_id_reached",
        "areas",
        "bytes_to_copy",
        "bytes_written",
        "bytes_zeroed",
        "bytes_skipped",
        "seconds",
        "error",
    ];
    const ESSENTIAL: &[&str] = &[
        "key",
        "copy",
        "change_id_used",
        "change_id_reached",
        "bytes_to_copy",
        "bytes_written",
        "error",
    ];
    let steps: [&dyn Fn(&mut Value); 6] = [
        &|v| keep_disks(v, ALL, usize::MAX),
        &|v| {
            keep_disks(v, ALL, 256);
            shorten_top(v, 2048, 512);
        },
        &|v| {
            keep_disks(v, ESSENTIAL, 96);
            shorten_top(v, 1024, 256);
        },
        &|v| {
            keep_disks(v, &["key", "change_id_reached"], 0);
            shorten_top(v, 768, 128);
        },
        &|v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("disks");
                o.remove("leftover_snapshots_removed");
            }
        },
        &|v| {
            *v = json!({
                "ok": v["ok"].take(), "reason": v["reason"].take(), "error": v["error"].take(),
                "vm": v["vm"].take(), "truncated": true,
            });
            shorten_top(v, 512, 64);
        },
    ];
    for step in steps {
        step(&mut v);
        if let Some(s) = fits(&v) {
            return s;
        }
    }
    // Only for absurdly small limits.
    let tiny = json!({"ok": result.ok, "truncated": true}).to_string();
    if tiny.len() <= limit {
        tiny
    } else {
        String::new()
    }
}

/// Shortens a JSON string to at most `max` bytes of UTF-8 (marking the cut with "…").
fn shorten(v: &mut serde_json::Value, max: usize) {
    if let serde_json::Value::String(s) = v
        && s.len() > max
    {
        let mut cut = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        if max >= '…'.len_utf8() {
            s.push('…');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(disks: usize, error_len: usize) -> BackupResult {
        let long = |tag: &str| {
            let mut s = format!("{tag}: ");
            // Quotes, control characters and multi-byte characters grow when escaped or cut.
            while s.len() < error_len {
                s.push_str("naïve \"quoted\"\n\t\u{1}✓ ");
            }
            s
        };
        BackupResult {
            ok: false,
            reason: Some("CopyFailed".into()),
            vm: Some("db-01".into()),
            vm_moref: Some("vm-42".into()),
            instance_uuid: Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into()),
            cbt_enabled_now: false,
            leftover_snapshots_removed: (0..50).map(|i| format!("sendense-old-{i}")).collect(),
            snapshot: Some(SnapshotResult {
                id: "snapshot-7".into(),
                name: "sendense-job".into(),
                removed: true,
                removal_error: None,
            }),
            disks: (0..disks)
                .map(|i| DiskResult {
                    key: 2000 + i as i32,
                    label: format!("Hard disk {i} with a rather long label"),
                    capacity: 64 << 30,
                    copy: "incremental".into(),
                    reason: "changes since the previous backup".into(),
                    change_id_used: format!("52 3c 1d 9e 4a 77 10 2b-8f 0e 44 61 9d 3a c2 71/{i}"),
                    change_id_reached: (i % 2 == 0).then(|| {
                        format!("52 3c 1d 9e 4a 77 10 2b-8f 0e 44 61 9d 3a c2 71/{}", i + 9)
                    }),
                    areas: 1234,
                    bytes_to_copy: 1 << 30,
                    bytes_written: 1 << 29,
                    sha256: Some("ab".repeat(32)),
                    error: (i % 2 == 1).then(|| long(&format!("disk {}", 2000 + i))),
                    ..Default::default()
                })
                .collect(),
            error: Some(long("disk 2001")),
        }
    }

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("invalid JSON ({e}): {s}"))
    }

    #[test]
    fn a_small_result_is_written_whole() {
        let r = result(2, 100);
        let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
        assert_eq!(s, serde_json::to_string(&r).unwrap());
        assert!(parse(&s).get("truncated").is_none());
    }

    #[test]
    fn large_results_shrink_to_the_limit_keeping_outcome_and_change_ids() {
        for (disks, error_len) in [(4, 5_000), (8, 600), (12, 300), (16, 100_000), (30, 2_000)] {
            let r = result(disks, error_len);
            let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
            assert!(
                s.len() <= TERMINATION_MESSAGE_LIMIT,
                "{disks} disks: {}",
                s.len()
            );
            let v = parse(&s);
            assert_eq!(v["truncated"], true);
            assert_eq!(v["ok"], false);
            assert_eq!(v["reason"], "CopyFailed");
            assert!(v["error"].as_str().unwrap().starts_with("disk 2001: naïve"));
            let d = v["disks"].as_array().expect("disks kept");
            assert_eq!(d.len(), disks);
            assert_eq!(
                d[0]["change_id_reached"],
                r.disks[0].change_id_reached.clone().unwrap().as_str()
            );
            assert!(
                d.iter()
                    .all(|d| d.get("sha256").is_none() && d.get("label").is_none())
            );
        }
    }

    #[test]
    fn results_too_large_for_any_disk_detail_keep_the_outcome() {
        let r = result(200, 50_000);
        let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
        assert!(s.len() <= TERMINATION_MESSAGE_LIMIT, "{}", s.len());
        let v = parse(&s);
        assert_eq!(
            (v["ok"].clone(), v["reason"].clone()),
            (false.into(), "CopyFailed".into())
        );
        assert_eq!(v["truncated"], true);
        assert!(v["error"].as_str().unwrap().ends_with('…'));
        for limit in [2000, 600, 200, 40, 5] {
            let s = compact_json(&r, limit);
            assert!(s.len() <= limit, "{limit}: {}", s.len());
            if !s.is_empty() {
                assert_eq!(parse(&s)["ok"], false);
            }
        }
    }

    #[test]
    fn shortening_respects_character_boundaries() {
        let mut v = serde_json::Value::String("ééééé".into());
        shorten(&mut v, 6);
        assert_eq!(v, "é…");
        let mut v = serde_json::Value::String("short".into());
        shorten(&mut v, 6);
        assert_eq!(v, "short");
    }
}
