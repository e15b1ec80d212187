//! Extraction into a directory on the host: directories, regular files (holes kept as holes),
//! symbolic links, with mode, owner and times as stored.
//!
//! Order matters: content first, then owner (chown clears setuid bits), then mode, then times
//! (writing content would move mtime); directories get theirs after everything inside them is
//! written, deepest first. A symbolic link already in the target is never followed: it is
//! replaced, and a path that would go through one is refused.

use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Report, expand, safe_name};
use crate::{FileSystem, Node, NodeKind, Timestamp};

/// Files are streamed in chunks of this size.
pub const CHUNK: usize = 1 << 20;
/// Within a chunk, all-zero runs of this size are skipped (left holes), as file systems
/// allocate in 4 KiB blocks.
const HOLE: usize = 4096;

/// Writes the selected paths (and everything in selected directories) under `target`, each at
/// its path from the volume's root: `/etc/hosts` becomes `target/etc/hosts`.
pub fn to_dir(
    fs: &dyn FileSystem,
    selection: &[(String, Node)],
    target: &Path,
    max_depth: usize,
) -> Report {
    let mut report = Report::default();
    if let Err(e) = std::fs::create_dir_all(target) {
        report.fail("/", format!("creating {}: {e}", target.display()));
        return report;
    }
    let owner = Owner::current();
    let entries = expand(fs, selection, max_depth, &mut report);
    let mut directories = Vec::new();
    for (path, node) in entries {
        let host = match host_path(target, &path) {
            Ok(host) => host,
            Err(why) => {
                report.fail(&path, why);
                continue;
            }
        };
        let result = match node.kind {
            NodeKind::Directory => make_directory(&host).map(|()| {
                report.directories += 1;
                directories.push((path.clone(), host.clone(), node.clone()));
            }),
            NodeKind::File => write_file(fs, &node, &host).map(|bytes| {
                report.files += 1;
                report.bytes += bytes;
            }),
            NodeKind::Symlink => make_symlink(fs, &node, &host).map(|()| report.symlinks += 1),
            NodeKind::Other => {
                report.skipped.push(path.clone());
                continue;
            }
        };
        if let Err(why) = result {
            report.fail(&path, why);
            continue;
        }
        if node.kind != NodeKind::Directory {
            finish(&path, &host, &node, &owner, &mut report);
        }
    }
    directories.sort_by_key(|(path, _, _)| std::cmp::Reverse(path.matches('/').count()));
    for (path, host, node) in directories {
        finish(&path, &host, &node, &owner, &mut report);
    }
    report
}

/// The host path for a volume path, its parents created as directories; refused when a name
/// is not safe or a parent in the target is a symbolic link or not a directory.
fn host_path(target: &Path, path: &str) -> Result<PathBuf, String> {
    let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
    if let Some(bad) = names.iter().find(|n| !safe_name(n)) {
        return Err(format!("name {bad:?} cannot be used on this system"));
    }
    let mut host = target.to_path_buf();
    for (i, name) in names.iter().enumerate() {
        host.push(name);
        if i + 1 == names.len() {
            break;
        }
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{} is in the way (not a directory)",
                    host.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&host)
                .map_err(|e| format!("creating {}: {e}", host.display()))?,
            Err(e) => return Err(format!("{}: {e}", host.display())),
        }
    }
    Ok(host)
}

/// Removes what is at `host` unless it is a directory (a restore replaces files and links).
fn clear(host: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(host) {
        Ok(m) if m.is_dir() => Err(format!("{} is a directory", host.display())),
        Ok(_) => {
            std::fs::remove_file(host).map_err(|e| format!("removing {}: {e}", host.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", host.display())),
    }
}

fn make_directory(host: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(host) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => clear(host)?,
        Err(_) => {}
    }
    std::fs::create_dir(host).map_err(|e| format!("creating {}: {e}", host.display()))
}

/// Streams a file's content; returns its size.
fn write_file(fs: &dyn FileSystem, node: &Node, host: &Path) -> Result<u64, String> {
    clear(host)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(host)
        .map_err(|e| format!("creating {}: {e}", host.display()))?;
    let mut buf = vec![0u8; CHUNK.min(node.size as usize).max(1)];
    let mut pos = 0u64;
    while pos < node.size {
        let want = (node.size - pos).min(buf.len() as u64) as usize;
        let got = read_full(fs, node, pos, &mut buf[..want])?;
        if got == 0 {
            return Err(format!(
                "content ends at byte {pos}, before its size {}",
                node.size
            ));
        }
        for (start, end) in data_runs(&buf[..got]) {
            file.write_all_at(&buf[start..end], pos + start as u64)
                .map_err(|e| format!("writing {}: {e}", host.display()))?;
        }
        pos += got as u64;
    }
    // Trailing holes: the size without the writes.
    file.set_len(node.size)
        .map_err(|e| format!("setting the size of {}: {e}", host.display()))?;
    Ok(node.size)
}

/// The byte ranges of `chunk` to write: runs of `HOLE`-sized pieces that are not all zeros.
fn data_runs(chunk: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in chunk.chunks(HOLE).enumerate() {
        if piece.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * HOLE, i * HOLE + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Reads until `buf` is full or the file ends.
pub(super) fn read_full(
    fs: &dyn FileSystem,
    node: &Node,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut done = 0;
    while done < buf.len() {
        let n = fs
            .read(node, offset + done as u64, &mut buf[done..])
            .map_err(|e| format!("reading at byte {}: {e}", offset + done as u64))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn make_symlink(fs: &dyn FileSystem, node: &Node, host: &Path) -> Result<(), String> {
    let target = fs
        .read_link(node)
        .map_err(|e| format!("reading the link: {e}"))?;
    clear(host)?;
    std::os::unix::fs::symlink(OsStr::from_bytes(&target), host)
        .map_err(|e| format!("creating {}: {e}", host.display()))
}

/// Who we run as, to know which owners we may set.
struct Owner {
    root: bool,
    uid: u32,
    gid: u32,
}

impl Owner {
    fn current() -> Self {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Self {
            root: uid == 0,
            uid,
            gid,
        }
    }
}

/// Owner, mode and times, in that order; a failure to set one is recorded, not fatal.
fn finish(path: &str, host: &Path, node: &Node, owner: &Owner, report: &mut Report) {
    if owner.root || (node.uid == owner.uid && node.gid == owner.gid) {
        if let Err(e) = std::os::unix::fs::lchown(host, Some(node.uid), Some(node.gid)) {
            report.fail(
                path,
                format!("setting owner {}:{}: {e}", node.uid, node.gid),
            );
        }
    } else {
        report.ownership_not_set.push(path.to_owned());
    }
    if node.kind != NodeKind::Symlink
        && let Err(e) =
            std::fs::set_permissions(host, std::fs::Permissions::from_mode(node.mode & 0o7777))
    {
        report.fail(path, format!("setting mode {:o}: {e}", node.mode));
    }
    if let Err(e) = set_times(host, node.atime, node.mtime) {
        report.fail(path, format!("setting times: {e}"));
    }
}

/// utimensat without following a symbolic link, to the nanosecond.
fn set_times(host: &Path, atime: Timestamp, mtime: Timestamp) -> io::Result<()> {
    let c = CString::new(host.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let spec = |t: Timestamp| libc::timespec {
        tv_sec: t.secs as libc::time_t,
        tv_nsec: t.nanos as _,
    };
    let times = [spec(atime), spec(mtime)];
    // SAFETY: `c` is a valid NUL-terminated path and `times` two initialised timespecs, both
    // alive for the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pieces_are_left_out_and_data_pieces_merged() {
        let mut chunk = vec![0u8; 5 * HOLE + 10];
        chunk[HOLE + 1] = 1;
        chunk[2 * HOLE] = 1;
        chunk[5 * HOLE + 9] = 1;
        assert_eq!(
            data_runs(&chunk),
            vec![(HOLE, 3 * HOLE), (5 * HOLE, 5 * HOLE + 10)]
        );
        assert!(data_runs(&[0; 100]).is_empty());
    }
}
