//! `repo prune`: retention's removal of one restore point from the middle (or either end) of
//! its chain, so that every point kept still reads byte-identically.
//!
//! 1. Locate: the point is a directory inside the root with a manifest ([`locate`]).
//! 2. Plan: its children (the committed points layered on it), per disk and child the cheaper
//!    merge by the data it moves ([`plan`], [`choose`]); refused when a backup is in flight on
//!    it or the files do not match the manifests. `--dry-run` stops here.
//! 3. Journal: the plan goes into the point's manifest (`retention`), replaced atomically,
//!    before any file is touched. From then on the point is not a restore point to read.
//! 4. Merge: each step done unless the files say it is ([`steps`]).
//! 5. Verify: each child's disks read through their new chains hash as their manifests record.
//! 6. Children's manifests point past the point; the point's files, manifest and directory go
//!    ([`finish`]).
//!
//! Killed anywhere, the same command run again finishes the job from the journal (3-6 again,
//! with the journal's decisions); once the manifest is gone there is nothing left but an empty
//! directory to remove.

pub mod chain;
pub mod choose;
mod finish;
mod locate;
pub mod lock;
mod plan;
pub mod steps;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sendense_contract::cli::RepoPruneArgs;
use sendense_contract::manifest::{MANIFEST_FILE, ManifestError, RetentionJournal};
use sendense_contract::prune::{PruneRefusal, PruneResult, PruneStep};

use chain::{Deadlines, Volume};
use steps::StepState;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Input that cannot work as given; nothing was written for it.
    #[error("{message}")]
    Refused { kind: PruneRefusal, message: String },
    /// The files are not what the journal planned: the prune stops, its journal stays.
    #[error("{0}")]
    Inconsistent(String),
    #[error("{what}: {message}")]
    Qemu { what: String, message: String },
    #[error(
        "{what} did not finish within {seconds} s (--timeout-seconds sets the limit); run the same prune again to continue"
    )]
    Timeout { what: String, seconds: u64 },
    #[error(
        "another repo prune still held the volume's lock {path} after {seconds} s (a prune pod deleted by force whose process still runs?); run the prune again when it has ended"
    )]
    Locked { path: String, seconds: u64 },
    #[error("{0} is not a QCOW2 image")]
    NotQcow2(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("listing the volume: {0}")]
    Scan(#[source] crate::repo::ProbeError),
    #[error("verifying disk {key} of {child}: {source}")]
    Read {
        child: String,
        key: i32,
        #[source]
        source: crate::commit::CommitError,
    },
    #[error(
        "disk {key} of {child} reads as SHA-256 {found} through its merged chain, its manifest records {expected}: the merge did not keep it byte-identical; nothing of the point was deleted and its journal stays"
    )]
    Mismatch {
        child: String,
        key: i32,
        expected: String,
        found: String,
    },
}

pub(crate) fn refused(kind: PruneRefusal, message: impl Into<String>) -> PruneError {
    PruneError::Refused {
        kind,
        message: message.into(),
    }
}

/// Runs `repo prune`; every outcome is a result.
pub async fn prune(args: &RepoPruneArgs) -> PruneResult {
    let started = Instant::now();
    let mut written = false;
    let mut result = match run(args, &mut written).await {
        Ok(r) => r,
        Err(e) => PruneResult {
            point: args.point.clone(),
            nothing_written: !written,
            refused: match &e {
                PruneError::Refused { kind, .. } => Some(*kind),
                _ => None,
            },
            error: Some(e.to_string()),
            ..Default::default()
        },
    };
    result.seconds = started.elapsed().as_secs_f64();
    result
}

async fn run(args: &RepoPruneArgs, written: &mut bool) -> Result<PruneResult, PruneError> {
    let deadlines = Deadlines {
        merge_override: args.timeout_seconds.map(Duration::from_secs),
    };
    let (vol, point) = locate::volume_and_point(&args.root, &args.point)?;
    // A dry run writes nothing (and may run on a read-only mount): no lock. Otherwise the
    // refusals come before the lock, so a refused prune writes nothing (not even the lock
    // file); under the lock everything is read again, as another prune may have changed it.
    let _lock = match args.dry_run {
        true => None,
        false => {
            if let Some(m) = locate::manifest(&vol, &point)? {
                plan::Neighbours::scan(&vol, &m, &deadlines)
                    .await?
                    .refusals(&m)?;
            }
            Some(lock::lock_volume(&vol.root, lock::LOCK_WAIT).await?)
        }
    };
    let Some(mut m) = locate::manifest(&vol, &point)? else {
        locate::already_gone(&vol, &point, written)?;
        return Ok(PruneResult {
            ok: true,
            point,
            already: true,
            ..Default::default()
        });
    };
    let found = plan::Neighbours::scan(&vol, &m, &deadlines).await?;
    found.refusals(&m)?;
    let resumed = m.retention.is_some();
    if resumed && args.dry_run {
        return Err(refused(
            PruneRefusal::BadArguments,
            format!(
                "{point} is being pruned already (its manifest holds the journal): there is no plan left to make; run the prune without --dry-run to finish it"
            ),
        ));
    }
    let journal = match m.retention.clone() {
        Some(j) => j,
        None => {
            let planned = plan::plan(&vol, &m, &found.children, &deadlines, now_rfc3339()).await?;
            if args.dry_run {
                return Ok(planned.dry_run_result(point));
            }
            m.retention = Some(planned.journal.clone());
            *written = true;
            let dir = vol.abs(&m.directory);
            finish::write_replacing(&dir.join(MANIFEST_FILE), &m.to_json())?;
            planned.journal
        }
    };
    *written = true;
    let mut reports = Vec::new();
    for step in &journal.steps {
        let capacity = m
            .disks
            .iter()
            .find(|d| d.device_key == step.device_key)
            .map_or(0, |d| d.capacity_bytes);
        let t = Instant::now();
        let state = steps::state(&vol, step, deadlines.inspect(capacity)).await?;
        let found_done = match state {
            StepState::Done => true,
            StepState::Inconsistent(why) => return Err(PruneError::Inconsistent(why)),
            StepState::Pending => {
                steps::perform(&vol, step, &deadlines, capacity).await?;
                match steps::state(&vol, step, deadlines.inspect(capacity)).await? {
                    StepState::Done => false,
                    StepState::Pending | StepState::Inconsistent(_) => {
                        return Err(PruneError::Inconsistent(format!(
                            "disk {} of {}: the {} step ran but its files do not show it done",
                            step.device_key,
                            step.child,
                            steps::strategy_name(step.strategy)
                        )));
                    }
                }
            }
        };
        reports.push(PruneStep {
            device_key: step.device_key,
            child: step.child.clone(),
            strategy: Some(step.strategy),
            bytes_to_move: step.bytes_to_move,
            found_done,
            verified: None,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    finish::verify(&vol, &journal).await?;
    for r in reports.iter_mut() {
        r.verified = Some(true);
    }
    finish::repoint_children(&vol, &m, &journal)?;
    let freed = bytes_freed(&vol, &journal);
    finish::delete_point(&vol, &m)?;
    Ok(PruneResult {
        ok: true,
        point,
        resumed,
        children: journal.children.clone(),
        bytes_moved: journal.steps.iter().map(|s| s.bytes_to_move).sum(),
        bytes_freed: freed,
        steps: reports,
        ..Default::default()
    })
}

/// The point's files' space when the prune started minus what its children's files grew by.
fn bytes_freed(vol: &Volume, journal: &RetentionJournal) -> i64 {
    let growth: i64 = journal
        .steps
        .iter()
        .map(|s| chain::allocated(&vol.abs(&s.child_file)) as i64 - s.child_allocated_bytes as i64)
        .sum();
    journal.allocated_bytes as i64 - growth
}

/// Now, in RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    rfc3339(jiff::Timestamp::now().as_second())
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_689_296), "2026-11-26T10:34:56Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
