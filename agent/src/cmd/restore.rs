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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sendense_contract::cli::{RestoreArgs, RestoreTarget, RestoreTargetKind};
use sendense_contract::restore::{RestoreResult, RestoredDisk};
use sendense_contract::result::TERMINATION_MESSAGE_LIMIT;

use super::{Outcome, refusal_of, refused, write_result_file};
use crate::backup::LiveProgress;
use crate::checksum;
use crate::cmd::copy::parse_areas_file;
use crate::copy::{
    ChangedArea, CopyKind, CopyOptions, FileSink, Progress, Sink, copy_areas, copy_areas_to,
};
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl, TlsClient};
use crate::qcow2::{Chain, copy_to_file};
use crate::qemu_nbd::{ReadOnlyExport, WritableExport};
use sendense_contract::progress::Stage;
use sendense_contract::restore::Refusal;

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

async fn restore(args: &RestoreArgs, started: Instant, live: &LiveProgress) -> RestoreResult {
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

/// Pairs sources with targets and checks both; nothing is written.
async fn check(args: &RestoreArgs, opts: &ConnectOptions) -> Result<Vec<Disk>> {
    let mut keys = Vec::new();
    for s in &args.sources {
        if keys.contains(&s.key) {
            return Err(refused(
                Refusal::BadArguments,
                format!("--source: disk {} is given twice", s.key),
            ));
        }
        keys.push(s.key);
    }
    let one = |what: &str, key: i32, n: usize| -> Result<()> {
        match n {
            0 => Err(refused(
                Refusal::BadArguments,
                format!("{what}: disk {key} has none (give one per --source)"),
            )),
            1 => Ok(()),
            _ => Err(refused(
                Refusal::BadArguments,
                format!("{what}: disk {key} is given {n} times"),
            )),
        }
    };
    for t in &args.targets {
        if !keys.contains(&t.key) {
            return Err(refused(
                Refusal::BadArguments,
                format!(
                    "--target {t}: no --source for disk {} (sources: {keys:?})",
                    t.key
                ),
            ));
        }
    }
    for (flag, extra) in [
        (
            "--areas-file",
            args.areas_files.iter().map(|a| a.key).collect::<Vec<_>>(),
        ),
        (
            "--expect-sha256",
            args.expect_sha256.iter().map(|a| a.key).collect(),
        ),
    ] {
        for k in extra {
            if !keys.contains(&k) {
                return Err(refused(
                    Refusal::BadArguments,
                    format!("{flag}: no --source for disk {k} (sources: {keys:?})"),
                ));
            }
        }
    }
    let mut disks = Vec::new();
    for s in &args.sources {
        let targets: Vec<_> = args.targets.iter().filter(|t| t.key == s.key).collect();
        one("--target", s.key, targets.len())?;
        let areas_files: Vec<_> = args.areas_files.iter().filter(|a| a.key == s.key).collect();
        if areas_files.len() > 1 {
            return Err(refused(
                Refusal::BadArguments,
                format!("--areas-file: disk {} is given twice", s.key),
            ));
        }
        let areas = match areas_files.first() {
            None => None,
            Some(f) => {
                let text = std::fs::read_to_string(&f.path)
                    .with_context(|| format!("--areas-file {f}"))?;
                Some(parse_areas_file(&text).with_context(|| format!("--areas-file {f}"))?)
            }
        };
        let expect = args
            .expect_sha256
            .iter()
            .find(|e| e.key == s.key)
            .map(|e| e.sha256.clone());
        let disk = open_source(s.key, &s.path, targets[0].clone(), areas, expect, opts)
            .await
            .with_context(|| format!("disk {}", s.key))?;
        check_target(&disk, opts)
            .await
            .with_context(|| format!("disk {}: target {}", disk.key, disk.target))?;
        disks.push(disk);
    }
    Ok(disks)
}

async fn open_source(
    key: i32,
    file: &Path,
    target: RestoreTarget,
    areas: Option<Vec<ChangedArea>>,
    expect: Option<String>,
    opts: &ConnectOptions,
) -> Result<Disk> {
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
    if matches!(target.kind, RestoreTargetKind::File(_)) && areas.is_none() {
        let top = file.to_owned();
        let opened = crate::copy::within(
            Duration::from_secs(sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS),
            move || Chain::open(&top),
        )
        .await;
        match opened {
            Ok(Ok(chain)) => {
                tracing::debug!(
                    disk = key,
                    links = chain.files().count(),
                    "reading the chain of {} in process",
                    file.display()
                );
                return Ok(Disk {
                    key,
                    source_file: file.to_owned(),
                    target,
                    areas,
                    expect,
                    source: Source::Chain(Arc::new(chain)),
                });
            }
            Ok(Err(e)) => tracing::debug!(
                disk = key,
                "reading the chain of {} through qemu-nbd: {e}",
                file.display()
            ),
            Err(e) => tracing::debug!(
                disk = key,
                "reading the chain of {} through qemu-nbd: opening it: {e}",
                file.display()
            ),
        }
    }
    let export = ReadOnlyExport::start(file)
        .await
        .with_context(|| format!("opening the chain of {}", file.display()))?;
    let source = NbdClient::connect(&export.url(), opts)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    if let Some(a) = areas.iter().flatten().find(|a| a.end() > source.size()) {
        return Err(refused(
            Refusal::BadArguments,
            format!(
                "--areas-file: area {}+{} ends past the disk's {} bytes",
                a.start,
                a.length,
                source.size()
            ),
        ));
    }
    Ok(Disk {
        key,
        source_file: file.to_owned(),
        target,
        areas,
        expect,
        source: Source::Nbd(Box::new(Served {
            _export: export,
            client: source,
        })),
    })
}

/// The target exists (or can be created), is of the kind named and holds the disk.
async fn check_target(disk: &Disk, opts: &ConnectOptions) -> Result<()> {
    let capacity = disk.capacity();
    match &disk.target.kind {
        RestoreTargetKind::File(path) => {
            let parent = parent_dir(path);
            let unusable = |m: String| Err(refused(Refusal::TargetUnusable, m));
            let pm = match std::fs::metadata(&parent) {
                Ok(m) => m,
                Err(e) => return unusable(format!("directory {}: {e}", parent.display())),
            };
            if !pm.is_dir() {
                return unusable(format!("{} is not a directory", parent.display()));
            }
            match std::fs::symlink_metadata(path) {
                Ok(m) if !m.is_file() => {
                    return unusable(format!(
                        "{} exists and is not a regular file",
                        path.display()
                    ));
                }
                Ok(m) if disk.areas.is_some() && m.len() != capacity => {
                    return unusable(format!(
                        "a rollback writes into the disk in place, but {} has {} bytes and the disk {capacity}",
                        path.display(),
                        m.len()
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && disk.areas.is_none() => {}
                Err(e) => return Err(e).with_context(|| path.display().to_string()),
            }
            if disk.areas.is_none() {
                let total = filesystem_bytes(&parent)?;
                if total < capacity {
                    return Err(refused(
                        Refusal::TargetTooSmall,
                        format!(
                            "the volume holding {} has {total} bytes, the disk needs {capacity}: give a volume of at least {capacity} bytes",
                            path.display()
                        ),
                    ));
                }
            }
        }
        RestoreTargetKind::Device(path) => {
            let size = device_size(path)?;
            if size < capacity {
                return Err(refused(
                    Refusal::TargetTooSmall,
                    format!(
                        "the device has {size} bytes, the disk needs {capacity}: give a device of at least {capacity} bytes"
                    ),
                ));
            }
        }
        RestoreTargetKind::Nbd { url, .. } => {
            let url: NbdUrl = url.parse()?;
            let client = NbdClient::connect(&url, opts).await?;
            let (size, read_only) = (client.size(), client.read_only());
            client.disconnect().await;
            if read_only {
                return Err(refused(Refusal::TargetUnusable, "the export is read-only"));
            }
            if size < capacity {
                return Err(refused(
                    Refusal::TargetTooSmall,
                    format!(
                        "the export has {size} bytes, the disk needs {capacity}: give an export of at least {capacity} bytes"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The size of the file system holding `dir`.
fn filesystem_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    Ok(st.f_blocks as u64 * st.f_frsize as u64)
}

/// A block device's size (or a file's, for tests that stand in a file for a device).
fn device_size(path: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    Ok(f.seek(std::io::SeekFrom::End(0))?)
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

/// A whole disk into a new sparse file, renamed over the target once complete. The file is
/// written directly (no NBD server in between), and every 4 KiB block that reads as zeros is
/// skipped, also inside data: the new file already reads as zeros there, so it stays sparse.
/// The chain is read in process when [`Chain::open`] took it, through qemu-nbd otherwise.
async fn restore_file(
    disk: &Disk,
    path: &Path,
    copy_opts: &CopyOptions,
    progress: &Progress,
    report: &mut RestoredDisk,
) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial);
    let written = async {
        // A partial file is only ever ours, from an earlier attempt.
        match std::fs::remove_file(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", partial.display()));
            }
            _ => {}
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        f.set_len(disk.capacity())
            .with_context(|| format!("sizing {}", partial.display()))?;
        let sink = FileSink::new(
            f.try_clone()?,
            disk.capacity(),
            Duration::from_secs(sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS),
        );
        let opts = CopyOptions {
            zero_run: SPARSE_BLOCK,
            ..copy_opts.clone()
        };
        let stats = match &disk.source {
            Source::Chain(chain) => copy_to_file(chain.clone(), &sink, progress).await,
            Source::Nbd(served) => {
                copy_areas_to(
                    &served.client,
                    Sink::File(&sink),
                    whole(disk),
                    CopyKind::Full,
                    &opts,
                    progress,
                )
                .await
            }
        }
        .with_context(|| format!("restoring {}", disk.source_file.display()))?;
        record(report, &stats);
        if let Some(expect) = &disk.expect {
            let actual = read_back(f, disk.capacity())
                .await
                .with_context(|| format!("reading {} back", partial.display()))?;
            verified(report, &actual, expect)?;
        }
        std::fs::rename(&partial, path)
            .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
        std::fs::File::open(parent_dir(path))
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent_dir(path).display()))?;
        anyhow::Ok(())
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
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

/// SHA-256 of the first `len` bytes of a flushed file, read back from its storage: its cached
/// pages are dropped first (POSIX_FADV_DONTNEED), so the bytes come from the volume, not from
/// what this process just wrote into the page cache.
async fn read_back(file: std::fs::File, len: u64) -> Result<String> {
    tokio::task::spawn_blocking(move || -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        file.sync_all()?;
        // SAFETY: a valid open descriptor; advice only, nothing is read or written.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    })
    .await?
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
    let stats = copy_areas(disk.nbd()?, target, areas, kind, copy_opts, progress)
        .await
        .with_context(|| format!("restoring {}", disk.source_file.display()))?;
    record(report, &stats);
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
