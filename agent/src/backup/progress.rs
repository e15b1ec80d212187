//! Live progress of a backup: the stage and every disk's copy counters, read by the status
//! endpoint (as the contract's [`ProgressReport`]) and printed on stderr.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sendense_contract::progress::{DiskProgress, ProgressReport, Stage};

use crate::copy::Progress;

/// Shared between the backup (which writes it) and its readers.
#[derive(Default)]
pub struct LiveProgress {
    disks: Mutex<BTreeMap<i32, Arc<Progress>>>,
    stage: Mutex<Stage>,
}

impl LiveProgress {
    pub fn stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_stage(&self, stage: Stage) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage;
    }

    /// The counters of disk `key`'s copy, reported from now on.
    pub fn add_disk(&self, key: i32) -> Arc<Progress> {
        let progress = Arc::new(Progress::default());
        self.disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, progress.clone());
        progress
    }

    /// The stage and every disk's counters, read now.
    pub fn report(&self) -> ProgressReport {
        let disks: Vec<DiskProgress> = self
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(key, p)| DiskProgress {
                key: *key,
                bytes_to_copy: p.total.load(Ordering::Relaxed),
                bytes_copied: p.done.load(Ordering::Relaxed),
                bytes_verified: p.verified.load(Ordering::Relaxed),
            })
            .collect();
        ProgressReport {
            stage: self.stage(),
            bytes_to_copy: disks.iter().map(|d| d.bytes_to_copy).sum(),
            bytes_copied: disks.iter().map(|d| d.bytes_copied).sum(),
            disks,
        }
    }
}

/// Progress on stderr every 2 s once there is something to copy: a bar on a terminal, a JSON
/// line otherwise. Never ends.
pub async fn print_to_stderr(live: &LiveProgress) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let report = live.report();
        let (done, total) = (report.bytes_copied, report.bytes_to_copy);
        if total == 0 {
            continue;
        }
        let pct = done as f64 * 100.0 / total as f64;
        if tty {
            let filled = (pct / 5.0) as usize;
            eprint!(
                "\r[{}{}] {pct:5.1}% {} / {} MiB",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20)),
                done >> 20,
                total >> 20
            );
        } else {
            eprintln!(
                "{}",
                serde_json::json!({"progress": {"bytes_done": done, "bytes_total": total, "percent": (pct * 10.0).round() / 10.0}})
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_sums_every_disk_at_the_current_stage() {
        let live = LiveProgress::default();
        assert_eq!(live.report(), ProgressReport::default());
        let a = live.add_disk(2001);
        let b = live.add_disk(2000);
        a.total.store(100, Ordering::Relaxed);
        a.done.store(40, Ordering::Relaxed);
        b.total.store(10, Ordering::Relaxed);
        live.set_stage(Stage::Copying);
        let r = live.report();
        assert_eq!(
            (r.stage, r.bytes_to_copy, r.bytes_copied),
            (Stage::Copying, 110, 40)
        );
        assert_eq!(
            r.disks.iter().map(|d| d.key).collect::<Vec<_>>(),
            [2000, 2001]
        );
    }
}
