//! A whole disk into a new sparse file: the chain read in process or through qemu-nbd, zeros
//! skipped, flushed, read back, renamed into place.

use super::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sendense_contract::restore::RestoredDisk;

use crate::copy::{CopyKind, CopyOptions, FileSink, Progress, Sink, copy_areas_to};
use crate::qcow2::copy_to_file;

/// A whole disk into a new sparse file, renamed over the target once complete. The file is
/// written directly (no NBD server in between), and every 4 KiB block that reads as zeros is
/// skipped, also inside data: the new file already reads as zeros there, so it stays sparse.
/// The chain is read in process when [`Chain::open`] took it, through qemu-nbd otherwise.
pub(super) async fn restore_file(
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
