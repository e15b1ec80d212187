//! `restore`: disks of a restore point written to their targets. Each source is the top QCOW2
//! of a disk's chain, served read-only (backing files followed, never modified) by a private
//! qemu-nbd; each target is a raw image file, a block device or an NBD export. The copy engine
//! of the backup moves the data: the same deadlines, bounded memory, block status to skip what
//! the chain holds as zeros.
//!
//! A whole disk restored into a file reads the chain in process ([`crate::qcow2`]) when every
//! link of it is supported, and through qemu-nbd otherwise (a debug line says why).
//!
//! Two phases. First every source and target is checked (the chain opens, the target exists,
//! is of the right kind and large enough, the areas fit the disk): a failure there writes
//! nothing (`nothingWritten` in the result). Then every disk is restored at once.
//!
//! - `file:` targets are written as a new file beside the old one (`<name>.sendense-partial`),
//!   created sparse at the disk's capacity; zeros are skipped, so holes stay holes. Only a
//!   complete, flushed (and, with `--expect-sha256`, verified) copy is renamed over the old
//!   file: a failed restore leaves what was there. With `--areas-file` the existing file is
//!   written in place (a rollback of a disk that holds a later state).
//! - `device:` and `nbd:` targets may hold old data: every byte is written, zeros as
//!   WRITE_ZEROES. `blank-nbd:` targets read as zeros already: zeros are skipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sendense_contract::cli::{RestoreArgs, RestoreTarget, RestoreTargetKind};
use sendense_contract::restore::{RestoreResult, RestoredDisk};
use sendense_contract::result::TERMINATION_MESSAGE_LIMIT;

use super::{Outcome, refusal_of, refused, write_result_file};
use crate::backup::LiveProgress;
use crate::checksum;
use crate::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use crate::nbd::{ConnectOptions, NbdClient, TlsClient};
use crate::qcow2::Chain;
use crate::qemu_nbd::{ReadOnlyExport, WritableExport};
use sendense_contract::progress::Stage;
use sendense_contract::restore::Refusal;

mod check;
mod file;

pub(crate) use check::source_file_exists;
use check::*;
use file::*;

/// Suffix of the file a `file:` target is written to before it is renamed into place.
pub const PARTIAL_SUFFIX: &str = ".sendense-partial";

/// How often progress is logged while disks are restored.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub async fn run(args: RestoreArgs) -> Result<Outcome> {
    let started = Instant::now();
    let live = Arc::new(LiveProgress::default());
    let result = match &args.status_addr {
        None => restore(&args, started, &live).await,
        Some(addr) => match crate::status::bind(addr).await {
            Err(e) => RestoreResult {
                error: Some(format!("--status-addr {addr}: cannot listen: {e}")),
                nothing_written: true,
                refused: Some(Refusal::BadArguments),
                ..Default::default()
            },
            Ok(listener) => {
                if let Ok(addr) = listener.local_addr() {
                    // The bound address: with port 0 the kernel chose it.
                    tracing::info!(%addr, "serving progress on /progress");
                }
                let serve = tokio::spawn(crate::status::serve(listener, live.clone()));
                let r = restore(&args, started, &live).await;
                serve.abort();
                r
            }
        },
    };
    let text = serde_json::to_string(&result)?;
    println!("{text}");
    if let Some(path) = &args.result_file {
        write_result_file(path, &result.compact_json(TERMINATION_MESSAGE_LIMIT))?;
    }
    Ok(Outcome::of(result.ok))
}

/// One disk, checked and ready to be written.
struct Disk {
    key: i32,
    source_file: PathBuf,
    target: RestoreTarget,
    areas: Option<Vec<ChangedArea>>,
    expect: Option<String>,
    source: Source,
}

/// How a disk's chain is read.
enum Source {
    /// In process (a whole disk into a file, every link supported).
    Chain(Arc<Chain>),
    /// Through qemu-nbd.
    Nbd(Box<Served>),
}

/// The chain's read-only qemu-nbd export, and a client connected to it.
struct Served {
    _export: ReadOnlyExport,
    client: NbdClient,
}

impl Disk {
    fn capacity(&self) -> u64 {
        match &self.source {
            Source::Chain(c) => c.size(),
            Source::Nbd(served) => served.client.size(),
        }
    }

    /// The NBD client of the chain's export (every target but a whole disk into a file).
    fn nbd(&self) -> Result<&NbdClient> {
        match &self.source {
            Source::Nbd(served) => Ok(&served.client),
            Source::Chain(_) => bail!("the chain of disk {} is not served over NBD", self.key),
        }
    }
}

pub(crate) async fn restore(
    args: &RestoreArgs,
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let failed = |error: anyhow::Error, nothing_written: bool, disks| RestoreResult {
        ok: false,
        refused: if nothing_written {
            refusal_of(&error)
        } else {
            None
        },
        error: Some(format!("{error:#}")),
        nothing_written,
        seconds: started.elapsed().as_secs_f64(),
        disks,
        vm: None,
        truncated: false,
    };
    let opts = match connect_options(args) {
        Ok(o) => o,
        Err(e) => {
            return failed(
                refused(Refusal::BadArguments, format!("{e:#}")),
                true,
                Vec::new(),
            );
        }
    };
    let disks = match check(args, &opts).await {
        Ok(d) => d,
        Err(e) => return failed(e, true, Vec::new()),
    };
    let copy_opts = CopyOptions {
        request_size: args.request_size,
        max_in_flight: args.in_flight,
        ..Default::default()
    };
    // The stage names are the backup's: `copying` while data moves, `done` at the end.
    live.set_stage(Stage::Copying);
    let progress: Vec<Arc<Progress>> = disks.iter().map(|d| live.add_disk(d.key)).collect();
    let ticker = tokio::spawn(log_progress(
        disks
            .iter()
            .map(|d| d.key)
            .zip(progress.iter().cloned())
            .collect(),
    ));
    let outcomes = futures::future::join_all(
        disks
            .iter()
            .zip(&progress)
            .map(|(d, p)| restore_disk(d, &copy_opts, &opts, p)),
    )
    .await;
    ticker.abort();
    live.set_stage(Stage::Done);
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for (disk, (report, outcome)) in disks.iter().zip(outcomes) {
        if let Err(e) = &outcome {
            errors.push(format!("disk {}: {e:#}", disk.key));
        }
        reports.push(report);
    }
    for d in disks {
        if let Source::Nbd(served) = d.source {
            served.client.disconnect().await;
        }
    }
    if errors.is_empty() {
        RestoreResult {
            ok: true,
            error: None,
            nothing_written: false,
            refused: None,
            seconds: started.elapsed().as_secs_f64(),
            disks: reports,
            vm: None,
            truncated: false,
        }
    } else {
        failed(anyhow!(errors.join("; ")), false, reports)
    }
}

fn connect_options(args: &RestoreArgs) -> Result<ConnectOptions> {
    let tls = args
        .tls_dir
        .as_deref()
        .map(TlsClient::from_dir)
        .transpose()
        .context("--tls-dir")?;
    Ok(ConnectOptions {
        connections: args.connections,
        tls,
        ..ConnectOptions::with_request_timeout(Duration::from_secs(args.request_timeout))
    })
}

/// Restores one disk; its report is filled in whatever happens.
async fn restore_disk(
    disk: &Disk,
    copy_opts: &CopyOptions,
    opts: &ConnectOptions,
    progress: &Progress,
) -> (RestoredDisk, Result<()>) {
    let started = Instant::now();
    let mut report = RestoredDisk {
        key: disk.key,
        target: disk.target.to_string(),
        capacity: disk.capacity(),
        ..Default::default()
    };
    let outcome = match &disk.target.kind {
        RestoreTargetKind::File(path) if disk.areas.is_none() => {
            restore_file(disk, path, copy_opts, progress, &mut report).await
        }
        RestoreTargetKind::File(path) | RestoreTargetKind::Device(path) => {
            async {
                let export = WritableExport::start(path).await?;
                let target = NbdClient::connect(&export.url(), &local_options()).await?;
                let written = write(
                    disk,
                    &target,
                    CopyKind::Incremental,
                    copy_opts,
                    progress,
                    &mut report,
                )
                .await;
                target.disconnect().await;
                written
            }
            .await
        }
        RestoreTargetKind::Nbd { url, blank } => {
            async {
                let target = NbdClient::connect(&url.parse()?, opts).await?;
                let kind = if *blank && disk.areas.is_none() {
                    CopyKind::Full
                } else {
                    CopyKind::Incremental
                };
                let written = write(disk, &target, kind, copy_opts, progress, &mut report).await;
                target.disconnect().await;
                written
            }
            .await
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = &outcome {
        report.error = Some(format!("{e:#}"));
    }
    (report, outcome)
}

/// Blocks of zeros at least this long (and aligned to it) inside data are not written into a
/// new image: the file system block, as `qemu-img convert -S 4k` does.
const SPARSE_BLOCK: usize = 4096;

/// The whole disk as one area.
fn whole(disk: &Disk) -> Vec<ChangedArea> {
    vec![ChangedArea {
        start: 0,
        length: disk.capacity(),
    }]
}

fn record(report: &mut RestoredDisk, stats: &crate::copy::CopyStats) {
    report.bytes_total = stats.total;
    report.bytes_written = stats.data;
    report.bytes_zeroed = stats.zeroed;
    report.bytes_skipped = stats.skipped;
}

fn verified(report: &mut RestoredDisk, actual: &str, expect: &str) -> Result<()> {
    let matched = actual.eq_ignore_ascii_case(expect);
    report.sha256 = Some(actual.to_owned());
    report.verified = Some(matched);
    if !matched {
        bail!(
            "read back after the flush, the restored disk hashes {actual}, the restore point {expect}"
        );
    }
    Ok(())
}

/// Connect options for the agent's own local qemu-nbd (on a Unix socket).
fn local_options() -> ConnectOptions {
    ConnectOptions {
        connections: 4,
        ..ConnectOptions::with_request_timeout(Duration::from_secs(
            sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS,
        ))
    }
}

/// Copies the disk (or its areas) to `target`, flushes, and verifies when asked.
async fn write(
    disk: &Disk,
    target: &NbdClient,
    kind: CopyKind,
    copy_opts: &CopyOptions,
    progress: &Progress,
    report: &mut RestoredDisk,
) -> Result<()> {
    let areas = disk.areas.clone().unwrap_or_else(|| whole(disk));
    // Without an expected SHA-256 (and always for a rollback, which is not hashed whole: that
    // would read the disk it meant to spare) every chunk written is read back instead.
    let read_back = disk.expect.is_none();
    let opts = CopyOptions {
        verify: read_back,
        // A rollback writes exactly its areas: the disk's bytes around them are the VM's.
        widen: disk.areas.is_none(),
        ..copy_opts.clone()
    };
    let stats = copy_areas(disk.nbd()?, target, areas, kind, &opts, progress)
        .await
        .with_context(|| format!("restoring {}", disk.source_file.display()))?;
    record(report, &stats);
    if read_back {
        let n = crate::copy::verify_written(target, &stats.chunks, opts.max_in_flight, progress)
            .await
            .context("reading the written areas back")?;
        report.bytes_verified = Some(n);
    }
    if let Some(expect) = &disk.expect {
        let actual = checksum::sha256_of_first(
            target,
            disk.capacity(),
            checksum::REQUEST_SIZE,
            checksum::IN_FLIGHT,
        )
        .await
        .context("reading the restored disk back")?;
        verified(report, &actual, expect)?;
    }
    Ok(())
}

async fn log_progress(disks: Vec<(i32, Arc<Progress>)>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        for (key, p) in &disks {
            let (done, total) = (p.done.load(Relaxed), p.total.load(Relaxed));
            tracing::info!(
                disk = key,
                done,
                total,
                written = p.data.load(Relaxed),
                "restore progress: {:.1}%",
                if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                }
            );
        }
    }
}
