//! In place: the refusals, the blocks CBT says changed since the restore point, the CBT reset.

use super::*;

pub(super) async fn in_place(
    args: &RestoreVmArgs,
    vs: &VSphere,
    reader: &DiskReader,
    sources: &[Source],
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let (vm, pairs, cbt) = match prepare_in_place(args, vs, sources).await {
        Ok(p) => p,
        Err(e) => return failure(e, true, started),
    };
    // What is written goes behind CBT's back: its change IDs will no longer describe the disks.
    // The reset comes before the first write (the blocks to write are known by now), so that
    // however the restore ends (a killed pod, retries given up) the next backup is a full one,
    // never an incremental missing the restored blocks. A retry then writes whole disks.
    let cbt_reset = cbt;
    if cbt && let Err(e) = vs.reset_cbt(&vm).await {
        return failure(
            anyhow!(e).context(format!(
                "resetting CBT on VM {} before writing into its disks",
                vm.name
            )),
            true,
            started,
        );
    }
    let mut result = write_disks(args, reader, &vm, &pairs, false, started, live).await;
    result.vm = Some(RestoredVm {
        name: vm.name.clone(),
        moref: vm.moref.clone(),
        instance_uuid: vm.instance_uuid.clone(),
        created: false,
        cbt_reset,
    });
    result
}

/// The refusals of an in-place restore, then what to write of each disk. Returns the VM, the
/// disks, and whether CBT is on.
async fn prepare_in_place<'a>(
    args: &RestoreVmArgs,
    vs: &VSphere,
    sources: &'a [Source],
) -> Result<(VmRef, Vec<(&'a Source, VmDisk, Plan)>, bool)> {
    let selector = match (&args.vm_uuid, &args.vm) {
        (Some(u), _) => VmSelector::InstanceUuid(u.clone()),
        (None, Some(n)) => VmSelector::Name(n.clone()),
        (None, None) => {
            return Err(refused(
                Refusal::BadArguments,
                "give --new-vm, --vm-uuid or --vm",
            ));
        }
    };
    let vm = vs
        .find_vm(&args.datacenter, &selector)
        .await
        .map_err(|e| not_found(e, Refusal::VmNotFound, "the VM to restore in place"))?;
    let state = vs.vm_state(&vm).await.context("reading the VM's state")?;
    if state.power_state != PowerState::PoweredOff {
        return Err(refused(
            Refusal::VmPoweredOn,
            format!(
                "VM {} is {}: power it off before restoring its disks in place (or restore to a new VM)",
                vm.name,
                match state.power_state {
                    PowerState::PoweredOn => "powered on",
                    PowerState::Suspended => "suspended",
                    PowerState::PoweredOff => "powered off",
                }
            ),
        ));
    }
    // This restore's own temporary snapshot, left by an attempt that died before removing it:
    // not the user's, and it must not block the retry.
    if args.tag.is_some() {
        let removed = vs
            .remove_snapshots_with_prefix(&vm, &restore_snapshot_name(args))
            .await
            .context("removing the temporary snapshot an earlier attempt left")?;
        if !removed.is_empty() {
            tracing::info!(vm = %vm.name, n = removed.len(), "removed an earlier attempt's snapshot");
        }
    }
    let info = vs.vm_info(&vm).await.context("reading the VM's disks")?;
    if !info.snapshots.is_empty() {
        let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
        return Err(refused(
            Refusal::VmHasSnapshots,
            format!(
                "VM {} has snapshots ({}): its disks are snapshot layers, not files to overwrite; delete the snapshots (or restore to a new VM)",
                vm.name,
                names.join(", ")
            ),
        ));
    }
    let mut pairs = Vec::new();
    for s in sources {
        let Some(d) = info.disks.iter().find(|d| d.key == s.key) else {
            let keys: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
            return Err(refused(
                Refusal::DiskNotFound,
                format!(
                    "VM {} has no disk {} (its disks: {keys:?}): restore to a new VM",
                    vm.name, s.key
                ),
            ));
        };
        if d.capacity != s.capacity {
            return Err(refused(
                Refusal::TargetUnusable,
                format!(
                    "disk {} of VM {} has {} bytes, the restore point's {}: a disk resized since cannot be restored in place; restore to a new VM",
                    s.key, vm.name, d.capacity, s.capacity
                ),
            ));
        }
        pairs.push((s, d.clone()));
    }
    let plans = changed_since(args, vs, &vm, info.cbt_enabled, &pairs).await?;
    let pairs = pairs
        .into_iter()
        .zip(plans)
        .map(|((s, d), p)| (s, d, p))
        .collect();
    Ok((vm, pairs, info.cbt_enabled))
}

/// What to write of each disk: the blocks CBT says changed since the restore point (plus the
/// later points' own blocks), or the whole disk and why.
async fn changed_since(
    args: &RestoreVmArgs,
    vs: &VSphere,
    vm: &VmRef,
    cbt: bool,
    disks: &[(&Source, VmDisk)],
) -> Result<Vec<Plan>> {
    let since: BTreeMap<i32, &str> = args
        .since_change_ids
        .iter()
        .map(|c| (c.key, c.change_id.as_str()))
        .collect();
    let full = |why: String| Plan {
        areas: None,
        full_reason: Some(why),
    };
    let asked = disks.iter().any(|(s, _)| since.contains_key(&s.key));
    if !asked {
        return Ok(disks
            .iter()
            .map(|_| full("no change ID of the restore point was given".into()))
            .collect());
    }
    if !cbt {
        return Ok(disks
            .iter()
            .map(|_| full("CBT is off on the VM".into()))
            .collect());
    }
    // vCenter answers QueryChangedDiskAreas for a snapshot: a temporary one, removed before
    // anything is written.
    let name = restore_snapshot_name(args);
    let snapshot = vs
        .create_snapshot(
            vm,
            &name,
            "Sendense: which blocks changed since the restore point",
            false,
        )
        .await
        .context("taking the snapshot that CBT is asked against")?;
    let mut plans = Vec::new();
    let mut error = None;
    for (s, d) in disks {
        let Some(change_id) = since.get(&s.key) else {
            plans.push(full("no change ID of the restore point".into()));
            continue;
        };
        match vs.changed_areas(vm, &snapshot, d, change_id).await {
            Ok(areas) => plans.push(Plan {
                areas: Some(areas),
                full_reason: None,
            }),
            Err(VSphereError::InvalidChangeId { message, .. }) => plans.push(full(format!(
                "vCenter no longer knows the restore point's change ID ({message}): CBT was reset or the disk recreated since"
            ))),
            Err(VSphereError::Fault { fault, message, .. }) if fault == "FileFault" => {
                plans.push(full(format!("CBT cannot answer for the disk: {message}")))
            }
            Err(e) => {
                error = Some(anyhow!(e).context(format!("asking CBT about disk {}", s.key)));
                break;
            }
        }
    }
    vs.ensure_snapshot_removed(vm, &snapshot)
        .await
        .context("removing the temporary snapshot")?;
    if let Some(e) = error {
        return Err(e);
    }
    for (plan, (s, _)) in plans.iter_mut().zip(disks) {
        let Some(areas) = plan.areas.as_mut() else {
            continue;
        };
        for layer in args.later_layers.iter().filter(|l| l.key == s.key) {
            let held = layer_areas(&layer.path)
                .await
                .with_context(|| format!("--later-layer {layer}"))?;
            areas.extend(
                held.into_iter()
                    .filter(|a| a.start < s.capacity)
                    .map(|a| ChangedArea {
                        start: a.start,
                        length: a.length.min(s.capacity - a.start),
                    }),
            );
        }
        areas.sort_by_key(|a| a.start);
    }
    Ok(plans)
}

/// The ranges a QCOW2 file holds itself (its backing file not followed): `qemu-img map` of the
/// file alone, `present` entries.
async fn layer_areas(file: &Path) -> Result<Vec<ChangedArea>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        start: u64,
        length: u64,
        #[serde(default)]
        present: bool,
    }
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": file},
    });
    let out = tokio::time::timeout(
        Duration::from_secs(sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS),
        tokio::process::Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(format!("json:{spec}"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("qemu-img map did not answer in time")?
    .context("running qemu-img map")?;
    if !out.status.success() {
        anyhow::bail!(
            "qemu-img map: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let entries: Vec<Entry> = serde_json::from_slice(&out.stdout).context("qemu-img map")?;
    Ok(entries
        .into_iter()
        .filter(|e| e.present && e.length > 0)
        .map(|e| ChangedArea {
            start: e.start,
            length: e.length,
        })
        .collect())
}

/// The temporary snapshot an in-place restore asks CBT against: named after the restore's tag
/// (the RestoreJob's UID), so a retry knows its own.
fn restore_snapshot_name(args: &RestoreVmArgs) -> String {
    format!(
        "{}restore-{}",
        args.snapshot_prefix,
        args.tag.as_deref().unwrap_or("cli")
    )
}
