//! The first phase: every source and target checked, nothing written.

use super::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sendense_contract::cli::{RestoreArgs, RestoreTarget, RestoreTargetKind};

use crate::cmd::copy::parse_areas_file;
use crate::cmd::refused;
use crate::copy::ChangedArea;
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};
use crate::qcow2::Chain;
use crate::qemu_nbd::ReadOnlyExport;
use sendense_contract::restore::Refusal;

/// Pairs sources with targets and checks both; nothing is written.
pub(super) async fn check(args: &RestoreArgs, opts: &ConnectOptions) -> Result<Vec<Disk>> {
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

/// A restore point's file is there and is a file (`SourceNotFound` otherwise).
pub(crate) fn source_file_exists(file: &Path) -> Result<()> {
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
    Ok(())
}

async fn open_source(
    key: i32,
    file: &Path,
    target: RestoreTarget,
    areas: Option<Vec<ChangedArea>>,
    expect: Option<String>,
    opts: &ConnectOptions,
) -> Result<Disk> {
    source_file_exists(file)?;
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

pub(super) fn parent_dir(path: &Path) -> PathBuf {
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
