//! `repo probe`: proves a repository volume is writable (a file written, synced, read back and
//! removed) and measures it (file system capacity, the QCOW2 files it holds).

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sendense_contract::ProbeReason;
use sendense_contract::manifest::{MANIFEST_FILE, Manifest};
pub use sendense_contract::probe::ProbeResult;
use sendense_contract::probe::UncommittedDir;

/// Why a probe step failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// An OS error; `what` says which step, on which path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("repository directory {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "repository directory {}: the {read} bytes read back from {} differ from the 4096 written",
        .dir.display(),
        .file.display()
    )]
    Corrupted {
        dir: PathBuf,
        file: PathBuf,
        read: usize,
    },
}

impl ProbeError {
    /// The result's reason.
    pub fn reason(&self) -> ProbeReason {
        match self {
            ProbeError::Io { source, .. } => io_reason(source),
            ProbeError::NotADirectory(_) => ProbeReason::NotADirectory,
            ProbeError::Corrupted { .. } => ProbeReason::Corrupted,
        }
    }
}

fn io_reason(e: &std::io::Error) -> ProbeReason {
    match e.raw_os_error() {
        Some(libc::EROFS) => ProbeReason::ReadOnly,
        Some(libc::EACCES) | Some(libc::EPERM) => ProbeReason::PermissionDenied,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ProbeReason::NoSpace,
        Some(libc::ENOENT) => ProbeReason::NotFound,
        Some(libc::ENOTDIR) => ProbeReason::NotADirectory,
        _ => ProbeReason::IoError,
    }
}

fn io_failure(what: String, source: std::io::Error) -> ProbeError {
    ProbeError::Io { what, source }
}

/// What a probe found besides its measures.
#[derive(Debug, Default)]
pub struct Found {
    /// The restore point manifests (with `list`), those of points being pruned included
    /// ([`Manifest::being_pruned`]: listed as such, not as restore points).
    pub manifests: Vec<Manifest>,
    /// Directories with an attempt's files and no manifest (with `list`).
    pub uncommitted: Vec<UncommittedDir>,
}

/// Orphaned attempt directories to remove before measuring: relative to the volume's root,
/// each removed only when nothing in it changed for `min_idle`.
#[derive(Debug, Default)]
pub struct Orphans<'a> {
    pub remove: &'a [String],
    pub min_idle: std::time::Duration,
}

/// Probes `dir`; never panics, every failure names the directory and the OS error. With
/// `list`, also the restore point manifests and the uncommitted attempt directories under it.
pub fn probe(dir: &Path, list: bool, orphans: &Orphans<'_>) -> (ProbeResult, Found) {
    match probe_inner(dir, list, orphans) {
        Ok(r) => r,
        Err(e) => (
            ProbeResult::failed(e.reason(), e.to_string()),
            Found::default(),
        ),
    }
}

fn probe_inner(
    dir: &Path,
    list: bool,
    orphans: &Orphans<'_>,
) -> Result<(ProbeResult, Found), ProbeError> {
    let shown = dir.display();
    let meta = std::fs::metadata(dir)
        .map_err(|e| io_failure(format!("repository directory {shown}"), e))?;
    if !meta.is_dir() {
        return Err(ProbeError::NotADirectory(dir.to_owned()));
    }
    write_read_back(dir)?;
    let (removed_orphans, kept_orphans) = remove_orphans(dir, orphans);
    let (capacity, free, available) =
        statvfs(dir).map_err(|e| io_failure(format!("statvfs of {shown}"), e))?;
    let Walked {
        files,
        bytes,
        manifests: found,
        uncommitted,
    } = walk(dir)?;
    let mut manifests = Vec::new();
    let mut unreadable = Vec::new();
    if list {
        for path in found {
            let read = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| Manifest::parse(&t).map_err(|e| e.to_string()));
            match read {
                Ok(m) => manifests.push(m),
                Err(e) => unreadable.push(format!("{}: {e}", path.display())),
            }
        }
    }
    unreadable.truncate(10);
    let result = ProbeResult {
        ok: true,
        capacity_bytes: Some(capacity),
        used_bytes: Some(capacity.saturating_sub(free)),
        available_bytes: Some(available),
        qcow2_files: Some(files),
        qcow2_bytes: Some(bytes),
        restore_points: list.then(|| manifests.iter().filter(|m| !m.being_pruned()).count() as u64),
        points_being_pruned: list
            .then(|| manifests.iter().filter(|m| m.being_pruned()).count() as u64),
        unreadable_manifests: unreadable,
        removed_orphans,
        kept_orphans,
        ..Default::default()
    };
    let uncommitted = if list { uncommitted } else { Vec::new() };
    Ok((
        result,
        Found {
            manifests,
            uncommitted,
        },
    ))
}

/// Removes the orphaned attempt directories asked for: (removed, kept with why). A directory
/// is kept when its path leaves the volume, when something in it changed within the idle
/// time (a writer may still be at work), or when `hub remove` refuses it (a manifest, a file
/// no attempt writes). A directory already gone counts as removed.
fn remove_orphans(root: &Path, orphans: &Orphans<'_>) -> (Vec<String>, Vec<String>) {
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for rel in orphans.remove {
        let path = Path::new(rel);
        if path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            kept.push(format!("{rel}: not a plain path inside the volume"));
            continue;
        }
        let full = root.join(path);
        match idle(&full) {
            Ok(Some(idle)) if idle < orphans.min_idle => {
                kept.push(format!(
                    "{rel}: changed {} s ago, less than the {} s an orphan must be left unchanged",
                    idle.as_secs(),
                    orphans.min_idle.as_secs()
                ));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                kept.push(format!("{rel}: {e}"));
                continue;
            }
        }
        match crate::hub::remove(std::slice::from_ref(&full)) {
            Ok(_) => removed.push(rel.clone()),
            Err(e) => kept.push(format!("{rel}: {e}")),
        }
    }
    (removed, kept)
}

/// Time since the directory or any entry in it was last modified (a qemu-nbd writing, a file
/// created or removed); `None` when it does not exist.
fn idle(dir: &Path) -> std::io::Result<Option<std::time::Duration>> {
    let newest = |m: &std::fs::Metadata| m.mtime();
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    };
    let mut latest = newest(&meta);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Ok(m) = entry.path().symlink_metadata() {
            latest = latest.max(newest(&m));
        }
    }
    Ok(Some(since(latest)))
}

/// Time from `secs` (seconds since the epoch) to now; zero for a time in the future.
fn since(secs: i64) -> std::time::Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    std::time::Duration::from_secs(now.saturating_sub(secs).max(0) as u64)
}

/// Writes 4 KiB to a new, uniquely named file in `dir`, syncs it, reads it back, removes it.
fn write_read_back(dir: &Path) -> Result<(), ProbeError> {
    use std::hash::BuildHasher;
    let nonce =
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    let path = dir.join(format!(
        ".sendense-probe-{}-{nonce:016x}",
        std::process::id()
    ));
    let shown = dir.display();
    let mut data = vec![0u8; 4096];
    let mut x = nonce | 1;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_failure(format!("repository directory {shown} is not writable"), e))?;
    let result = (|| {
        file.write_all(&data)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_failure(format!("writing {}", path.display()), e))?;
        drop(file);
        let mut back = Vec::with_capacity(data.len());
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut back))
            .map_err(|e| io_failure(format!("reading back {}", path.display()), e))?;
        if back != data {
            return Err(ProbeError::Corrupted {
                dir: dir.to_owned(),
                file: path.clone(),
                read: back.len(),
            });
        }
        Ok(())
    })();
    let removed = std::fs::remove_file(&path)
        .map_err(|e| io_failure(format!("removing {}", path.display()), e));
    result.and(removed)
}

/// (capacity, free, available to unprivileged users) in bytes.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = if st.f_frsize > 0 {
        st.f_frsize as u64
    } else {
        st.f_bsize as u64
    };
    Ok((
        st.f_blocks as u64 * unit,
        st.f_bfree as u64 * unit,
        st.f_bavail as u64 * unit,
    ))
}

/// What a walk of the volume found.
pub(crate) struct Walked {
    /// Number and allocated bytes of `*.qcow2` files.
    files: u64,
    bytes: u64,
    /// The restore point manifests.
    pub(crate) manifests: Vec<PathBuf>,
    /// Directories holding an attempt's files and no manifest.
    pub(crate) uncommitted: Vec<UncommittedDir>,
}

/// Walks `dir` (symbolic links not followed). Entries that vanish while walking (a job cleaning
/// up) are skipped.
pub(crate) fn walk(dir: &Path) -> Result<Walked, ProbeError> {
    let mut out = Walked {
        files: 0,
        bytes: 0,
        manifests: Vec::new(),
        uncommitted: Vec::new(),
    };
    let mut pending: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(io_failure(format!("listing {}", d.display()), e)),
        };
        let (mut attempt_files, mut attempt_bytes, mut committed) = (false, 0u64, false);
        let mut latest = d.symlink_metadata().map(|m| m.mtime()).unwrap_or(0);
        for entry in entries {
            let entry = entry.map_err(|e| io_failure(format!("listing {}", d.display()), e))?;
            let meta = match entry.path().symlink_metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io_failure(format!("{}", entry.path().display()), e));
                }
            };
            latest = latest.max(meta.mtime());
            let name = entry.file_name();
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() && name == MANIFEST_FILE {
                out.manifests.push(entry.path());
                committed = true;
            } else if meta.is_file() && crate::hub::attempt_file(&name) {
                attempt_files = true;
                attempt_bytes += meta.blocks() * 512;
                if Path::new(&name).extension().is_some_and(|e| e == "qcow2") {
                    out.files += 1;
                    out.bytes += meta.blocks() * 512;
                }
            }
        }
        if attempt_files
            && !committed
            && let Ok(rel) = d.strip_prefix(dir)
        {
            out.uncommitted.push(UncommittedDir {
                dir: rel.to_string_lossy().into_owned(),
                idle_seconds: since(latest).as_secs(),
                bytes: attempt_bytes,
            });
        }
    }
    out.manifests.sort();
    out.uncommitted.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_serialize_without_measurements() {
        let r = ProbeResult::failed(
            ProbeReason::ReadOnly,
            "x: Read-only file system (os error 30)",
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"ok": false, "reason": "ReadOnly", "error": "x: Read-only file system (os error 30)"})
        );
        assert_eq!(
            io_reason(&std::io::Error::from_raw_os_error(libc::EROFS)),
            ProbeReason::ReadOnly
        );
    }
}
