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

mod in_place;
mod new_vm;
mod write;

use in_place::in_place;
use new_vm::into_new_vm;
use write::write_disks;

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
    let connection = Connection::from(args);
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
    crate::cmd::restore::source_file_exists(file)?;
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
