//! One prune at a time per volume. A prune pod deleted by force leaves its process running
//! until the kubelet kills it, while the operator already starts the next one: two merges of
//! the same chain at once would each undo the other's steps. Every `repo prune` therefore holds
//! an exclusive lock on `<root>/.sendense-prune.lock` (flock: the kernel drops it when the
//! process ends, however it ends), waiting up to [`LOCK_WAIT`] for an earlier one to finish.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use super::PruneError;

pub const LOCK_FILE: &str = ".sendense-prune.lock";
/// How long a prune waits for the one before it.
pub const LOCK_WAIT: Duration = Duration::from_secs(600);

/// The volume's prune lock, held until the returned file is dropped (or the process ends).
pub async fn lock_volume(root: &Path, wait: Duration) -> Result<File, PruneError> {
    let path = root.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| PruneError::Io {
            path: path.clone(),
            source,
        })?;
    let started = Instant::now();
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(source)) => return Err(PruneError::Io { path, source }),
        }
        if started.elapsed() >= wait {
            return Err(PruneError::Locked {
                path: path.display().to_string(),
                seconds: wait.as_secs(),
            });
        }
        if !said {
            tracing::info!(lock = %path.display(), "another repo prune holds the volume's lock: waiting for it");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
