//! `restore-vm`: a restore point's disks back into vSphere.
//!
//! - **New VM** (`--new-vm`): created in the folder, pool and datastore given, one thin disk
//!   per restored disk with its capacity, then each disk written whole through the transport
//!   (zeros skipped: a new disk reads as zeros) and read back against the restore point's
//!   SHA-256. A VM of that name is refused, unless a failed attempt of this restore (same
//!   `--tag` in its annotation, powered off) left it: that one is destroyed and made again.
//!   A restore that fails after creating the VM destroys it.
//! - **In place** (`--vm-uuid`/`--vm`): refused unless the VM is powered off and has no
//!   snapshots, and each restored disk is on the VM with the same capacity. With
//!   `--since-change-id` and CBT valid on the VM, a temporary snapshot lets vCenter say which
//!   blocks changed since the restore point (`QueryChangedDiskAreas`); only those (and the
//!   blocks of the later restore points' own files, `--later-layer`) are written back, zeros
//!   included, and read back. Otherwise the whole disk is written and hashed.
//!
//! Data written into flat files is not seen by CBT, so before an in-place restore writes
//! anything (once vCenter has said which blocks changed) the VM's CBT is reset: every change
//! ID issued before becomes invalid, and the next backup is a full one (never an incremental
//! that misses the restored blocks), however the restore ends.
//!
//! Nothing is written before every refusal above has been checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use sendense_contract::cli::{
    DiskPath, DiskSha256, RestoreArgs, RestoreTarget, RestoreTargetKind, RestoreVmArgs, Transport,
};
use sendense_contract::restore::{Refusal, RestoreResult, RestoredVm};
use sendense_contract::result::TERMINATION_MESSAGE_LIMIT;
use sendense_vsphere::{
    Disk as VmDisk, Hardware, NewVm, PowerState, VSphere, VSphereError, VmRef, VmSelector,
};

use super::{Outcome, refusal_of, refused, write_result_file};
use crate::backup::LiveProgress;
use crate::backup::plan::{self, Connection};
use crate::copy::ChangedArea;
use crate::nbd::{ConnectOptions, NbdClient};
use crate::qcow2::Chain;
use crate::qemu_nbd::ReadOnlyExport;
use crate::source::{Access, DiskReader, DiskSource};

pub async fn run(args: RestoreVmArgs) -> Result<Outcome> {
    let started = Instant::now();
    let live = Arc::new(LiveProgress::default());
    let result = match &args.status_addr {
        None => restore_vm(&args, started, &live).await,
        Some(addr) => match crate::status::bind(addr).await {
            Err(e) => failure(
                refused(
                    Refusal::BadArguments,
                    format!("--status-addr {addr}: cannot listen: {e}"),
                ),
                true,
                started,
            ),
            Ok(listener) => {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "serving progress on /progress");
                }
                let serve = tokio::spawn(crate::status::serve(listener, live.clone()));
                let r = restore_vm(&args, started, &live).await;
                serve.abort();
                r
            }
        },
    };
    println!("{}", serde_json::to_string(&result)?);
    if let Some(path) = &args.result_file {
        write_result_file(path, &result.compact_json(TERMINATION_MESSAGE_LIMIT))?;
    }
    if let Some(e) = &result.error {
        eprintln!("sendense-agent: restore-vm failed: {e}");
    }
    Ok(Outcome::of(result.ok))
}

fn failure(e: anyhow::Error, nothing_written: bool, started: Instant) -> RestoreResult {
    RestoreResult {
        ok: false,
        refused: if nothing_written {
            refusal_of(&e)
        } else {
            None
        },
        error: Some(format!("{e:#}")),
        nothing_written,
        seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    }
}

/// One restored disk: the restore point's chain and its capacity.
struct Source {
    key: i32,
    path: PathBuf,
    capacity: u64,
}

/// How an in-place disk is written.
struct Plan {
    /// `None`: the whole disk.
    areas: Option<Vec<ChangedArea>>,
    full_reason: Option<String>,
}

async fn restore_vm(args: &RestoreVmArgs, started: Instant, live: &LiveProgress) -> RestoreResult {
    let timeout = Duration::from_secs(args.request_timeout);
    let (vcenter, reader) = match check_arguments(args, timeout) {
        Ok(c) => c,
        Err(e) => return failure(e, true, started),
    };
    let sources = match open_sources(args).await {
        Ok(s) => s,
        Err(e) => return failure(e, true, started),
    };
    let vs = match VSphere::connect(vcenter).await {
        Ok(vs) => vs,
        Err(e) => return failure(anyhow!(e).context("connecting to vCenter"), true, started),
    };
    let result = match &args.new_vm {
        Some(name) => into_new_vm(args, &vs, &reader, &sources, name, started, live).await,
        None => in_place(args, &vs, &reader, &sources, started, live).await,
    };
    vs.logout().await;
    result
}

/// The command line, the credentials, and (nfs) the datastores needed are mounted.
fn check_arguments(
    args: &RestoreVmArgs,
    timeout: Duration,
) -> Result<(sendense_vsphere::VCenterConfig, DiskReader)> {
    let bad = |m: String| refused(Refusal::BadArguments, m);
    let mut keys = Vec::new();
    for s in &args.sources {
        if keys.contains(&s.key) {
            return Err(bad(format!("--source: disk {} is given twice", s.key)));
        }
        keys.push(s.key);
    }
    let extra = args
        .expect_sha256
        .iter()
        .map(|e| ("--expect-sha256", e.key))
        .chain(
            args.since_change_ids
                .iter()
                .map(|c| ("--since-change-id", c.key)),
        )
        .chain(args.later_layers.iter().map(|l| ("--later-layer", l.key)));
    for (flag, key) in extra {
        if !keys.contains(&key) {
            return Err(bad(format!(
                "{flag}: no --source for disk {key} (sources: {keys:?})"
            )));
        }
    }
    if args.new_vm.is_some() && (!args.since_change_ids.is_empty() || !args.later_layers.is_empty())
    {
        return Err(bad(
            "--since-change-id and --later-layer are for a restore in place, not --new-vm".into(),
        ));
    }
    if args.new_vm.as_deref().is_some_and(str::is_empty) {
        return Err(bad("--new-vm: give the new VM's name".into()));
    }
    let connection = Connection {
        vcenter: &args.vcenter,
        thumbprint: args.thumbprint.as_ref(),
        ca_file: args.ca_file.as_ref(),
        insecure_skip_verify: args.insecure_skip_verify,
        credentials_dir: args.credentials_dir.as_deref(),
        transport: args.transport,
        datastores: &args.datastores,
        vddk_libdir: &args.vddk_libdir,
        vddk_modes: &args.vddk_modes,
    };
    let (vcenter, reader) =
        plan::connection(&connection, timeout, &plan::Process).map_err(|e| {
            if e.reason() == sendense_contract::AgentReason::CredentialsUnavailable {
                anyhow!(e)
            } else {
                bad(e.to_string())
            }
        })?;
    if let (Transport::Nfs, Some(ds)) = (args.transport, &args.target_datastore)
        && !args.datastores.iter().any(|d| &d.name == ds)
    {
        let mounted: Vec<&str> = args.datastores.iter().map(|d| d.name.as_str()).collect();
        return Err(refused(
            Refusal::TargetUnusable,
            format!(
                "datastore {ds:?} is not mounted in the agent (mounted: {}): the nfs transport writes the new disks' files through it; add it to the SourceNode's nfs datastores",
                mounted.join(", ")
            ),
        ));
    }
    Ok((vcenter, reader))
}

/// Every chain opens; its capacity.
async fn open_sources(args: &RestoreVmArgs) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for s in &args.sources {
        let capacity = capacity_of(&s.path)
            .await
            .with_context(|| format!("disk {}", s.key))?;
        out.push(Source {
            key: s.key,
            path: s.path.clone(),
            capacity,
        });
    }
    out.sort_by_key(|s| s.key);
    Ok(out)
}

async fn capacity_of(file: &Path) -> Result<u64> {
    let meta = std::fs::metadata(file).map_err(|e| {
        refused(
            Refusal::SourceNotFound,
            format!("restore point file {}: {e}", file.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(refused(
            Refusal::SourceNotFound,
            format!("restore point file {} is not a file", file.display()),
        ));
    }
    let top = file.to_owned();
    let deadline = Duration::from_secs(sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS);
    if let Ok(Ok(chain)) = crate::copy::within(deadline, move || Chain::open(&top)).await {
        return Ok(chain.size());
    }
    // A chain the in-process reader does not take: qemu-nbd opens it (or says why not).
    let export = ReadOnlyExport::start(file).await.map_err(|e| {
        refused(
            Refusal::SourceNotFound,
            format!("opening the chain of {}: {e}", file.display()),
        )
    })?;
    let client = NbdClient::connect(&export.url(), &ConnectOptions::default())
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let size = client.size();
    client.disconnect().await;
    Ok(size)
}

/// A vSphere error that means "the input names something that is not there".
fn not_found(e: VSphereError, kind: Refusal, what: &str) -> anyhow::Error {
    match e {
        VSphereError::NotFound(m) => refused(kind, format!("{what}: {m}")),
        e => anyhow!(e).context(what.to_owned()),
    }
}

/// The annotation line that marks a VM made by the restore tagged `tag`.
fn marker(tag: &str) -> String {
    format!("sendense.io/restore: {tag}")
}

async fn into_new_vm(
    args: &RestoreVmArgs,
    vs: &VSphere,
    reader: &DiskReader,
    sources: &[Source],
    name: &str,
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let vm = match create(args, vs, sources, name).await {
        Ok(vm) => vm,
        Err(e) => return failure(e, true, started),
    };
    let outcome = async {
        let disks = vs
            .vm_info(&vm)
            .await
            .context("reading the new VM's disks")?
            .disks;
        let mut disks: Vec<VmDisk> = disks;
        disks.sort_by_key(|d| d.key);
        if disks.len() != sources.len() {
            anyhow::bail!(
                "the new VM has {} disks, {} were asked for",
                disks.len(),
                sources.len()
            );
        }
        // The new disks are the restored ones in device-key order.
        let pairs: Vec<(&Source, VmDisk, Plan)> = sources
            .iter()
            .zip(disks)
            .map(|(s, d)| {
                (
                    s,
                    d,
                    Plan {
                        areas: None,
                        full_reason: Some("a new VM".into()),
                    },
                )
            })
            .collect();
        Ok(write_disks(args, reader, &vm, &pairs, true, started, live).await)
    }
    .await;
    let mut result = match outcome {
        Ok(r) => r,
        Err(e) => failure(e, false, started),
    };
    if !result.ok {
        // A half-restored VM is worse than none: the next attempt creates it again.
        match vs.destroy_vm(&vm).await {
            Ok(()) => tracing::info!(vm = %vm.name, "destroyed the VM of the failed restore"),
            Err(e) => {
                let error = result.error.take().unwrap_or_default();
                result.error = Some(format!(
                    "{error}; destroying the new VM {} ({}) failed too: {e}",
                    vm.name, vm.moref
                ));
            }
        }
    }
    result.vm = Some(RestoredVm {
        name: vm.name.clone(),
        moref: vm.moref.clone(),
        instance_uuid: vm.instance_uuid.clone(),
        created: true,
        cbt_reset: false,
    });
    result
}

/// Creates the VM; a leftover of a failed attempt of the same restore is destroyed first.
async fn create(
    args: &RestoreVmArgs,
    vs: &VSphere,
    sources: &[Source],
    name: &str,
) -> Result<VmRef> {
    match vs
        .find_vm(&args.datacenter, &VmSelector::Name(name.to_owned()))
        .await
    {
        Ok(existing) => {
            let state = vs.vm_state(&existing).await?;
            let ours = args
                .tag
                .as_deref()
                .is_some_and(|t| state.annotation.lines().any(|l| l == marker(t)));
            if !ours || state.power_state != PowerState::PoweredOff {
                return Err(refused(
                    Refusal::VmExists,
                    format!(
                        "a VM named {name:?} exists in datacenter {:?}: choose another name for the new VM, or restore in place",
                        args.datacenter
                    ),
                ));
            }
            tracing::info!(
                vm = name,
                "destroying the VM a failed attempt of this restore left"
            );
            vs.destroy_vm(&existing)
                .await
                .context("destroying the VM a failed attempt left")?;
        }
        Err(VSphereError::NotFound(_)) => {}
        Err(e) => return Err(anyhow!(e).context(format!("looking for a VM named {name:?}"))),
    }
    let spec = NewVm {
        name: name.to_owned(),
        folder: args.folder.clone(),
        resource_pool: args.resource_pool.clone(),
        datastore: args.target_datastore.clone().unwrap_or_default(),
        hardware: Hardware {
            num_cpus: args.cpus,
            memory_mib: args.memory_mib,
            guest_id: args.guest_id.clone(),
            firmware: args.firmware.clone(),
        },
        disks: sources.iter().map(|s| s.capacity).collect(),
        annotation: args.tag.as_deref().map(marker).unwrap_or_default(),
        change_tracking: false,
    };
    vs.create_vm(&args.datacenter, &spec)
        .await
        .map_err(|e| not_found(e, Refusal::PlacementNotFound, "creating the VM"))
}

async fn in_place(
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
    let name = format!(
        "{}restore-{}",
        args.snapshot_prefix,
        args.tag.as_deref().unwrap_or("cli")
    );
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

/// Serves each VM disk writable through the transport and runs the restore engine into it.
async fn write_disks(
    args: &RestoreVmArgs,
    reader: &DiskReader,
    vm: &VmRef,
    disks: &[(&Source, VmDisk, Plan)],
    blank: bool,
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let scratch = std::env::temp_dir().join(format!("sendense-restore-vm-{}", std::process::id()));
    let prepared = async {
        std::fs::create_dir_all(&scratch).context("scratch directory")?;
        let mut exports: Vec<DiskSource> = Vec::new();
        let mut restore = RestoreArgs::new(Vec::new(), Vec::new());
        for (s, d, plan) in disks {
            let export = reader.open(vm, Access::Write, d).await.map_err(|e| {
                refused(
                    Refusal::TargetUnusable,
                    format!("disk {}: serving {} writable: {e}", s.key, d.file_name),
                )
            })?;
            restore.sources.push(DiskPath {
                key: s.key,
                path: s.path.clone(),
            });
            restore.targets.push(RestoreTarget {
                key: s.key,
                kind: RestoreTargetKind::Nbd {
                    url: export.url_text(),
                    blank,
                },
            });
            match &plan.areas {
                Some(areas) => {
                    let file = scratch.join(format!("{}.areas", s.key));
                    let text: String = areas
                        .iter()
                        .map(|a| format!("{}+{}\n", a.start, a.length))
                        .collect();
                    std::fs::write(&file, text).context("writing the areas file")?;
                    restore.areas_files.push(DiskPath {
                        key: s.key,
                        path: file,
                    });
                }
                None => {
                    if let Some(e) = args.expect_sha256.iter().find(|e| e.key == s.key) {
                        restore.expect_sha256.push(DiskSha256 {
                            key: s.key,
                            sha256: e.sha256.clone(),
                        });
                    }
                }
            }
            exports.push(export);
        }
        restore.request_size = args.request_size;
        restore.in_flight = args.in_flight;
        restore.request_timeout = args.request_timeout;
        anyhow::Ok((exports, restore))
    }
    .await;
    let mut result = match prepared {
        Ok((exports, restore)) => {
            let r = super::restore::restore(&restore, started, live).await;
            drop(exports);
            r
        }
        Err(e) => failure(e, true, started),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    for r in &mut result.disks {
        if let Some((_, d, plan)) = disks.iter().find(|(s, _, _)| s.key == r.key) {
            r.file = Some(d.file_name.clone());
            r.target = d.file_name.clone();
            r.differential = Some(plan.areas.is_some());
            r.full_reason = plan.full_reason.clone();
        }
    }
    result
}
