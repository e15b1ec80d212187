//! The merge steps the journal records: whether one is done (read from the files, so that a
//! prune resumed after a crash recognises what it finished), and doing it. Every step can be
//! stopped anywhere and done again, and at no moment does a child read differently:
//!
//! - commit-down: `qemu-img commit -d` writes the child's own data into the point's file
//!   (the child's layer is kept, and hides exactly what was written), then the point's file is
//!   renamed over the child's (one atomic switch between two files that read the same). Done
//!   when the point's file is gone from its path and the child's file is layered on the
//!   point's parent's file (or on nothing).
//! - rebase-up: `qemu-img rebase` (safe mode, write-through) copies into the child what the
//!   point held and the child does not hide, then rewrites its backing file. Done when the
//!   child's file is layered on the point's parent's file (or on nothing).

use sendense_contract::manifest::{MergeStep, MergeStrategy};

use super::PruneError;
use super::chain::{self, Backing, Volume};

/// What the files say about a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    Done,
    /// Not done, and can be (again, when an earlier run was stopped in it).
    Pending,
    /// Neither: the files are not what the journal planned (named in the message).
    Inconsistent(String),
}

/// The state of `step` from whether the point's file is still at its path and what the
/// child's file is layered on.
pub fn detect(step: &MergeStep, point_file_present: bool, child: &Backing) -> StepState {
    let on = |target: Option<&str>| match target {
        None => child.written.is_none(),
        Some(t) => child.resolved.as_deref() == Some(t),
    };
    let on_parent = on(step.backing_file.as_deref());
    let on_point = on(Some(&step.file));
    match (step.strategy, point_file_present, on_parent, on_point) {
        (MergeStrategy::CommitDown, false, true, _) => StepState::Done,
        (MergeStrategy::RebaseUp, _, true, _) => StepState::Done,
        (_, true, _, true) => StepState::Pending,
        _ => StepState::Inconsistent(format!(
            "disk {} of {}: {} is layered on {}, and {} {}: neither before nor after its {} step",
            step.device_key,
            step.child,
            step.child_file,
            child.written.as_deref().unwrap_or("nothing"),
            step.file,
            if point_file_present {
                "is there"
            } else {
                "is gone"
            },
            strategy_name(step.strategy),
        )),
    }
}

pub fn strategy_name(s: MergeStrategy) -> &'static str {
    match s {
        MergeStrategy::CommitDown => "commit-down",
        MergeStrategy::RebaseUp => "rebase-up",
    }
}

/// Reads a step's state from the volume.
pub async fn state(
    vol: &Volume,
    step: &MergeStep,
    deadline: std::time::Duration,
) -> Result<StepState, PruneError> {
    let present = vol.abs(&step.file).exists();
    let child = chain::backing(vol, &step.child_file, deadline).await?;
    Ok(detect(step, present, &child))
}

/// Does `step` (pending: its state was just read).
pub async fn perform(
    vol: &Volume,
    step: &MergeStep,
    deadlines: &chain::Deadlines,
    capacity: u64,
) -> Result<(), PruneError> {
    let child = vol.abs(&step.child_file);
    let child_dir = child.parent().unwrap_or(&vol.root).to_owned();
    let what = |verb: &str| {
        format!(
            "{} of disk {} of {} ({verb})",
            strategy_name(step.strategy),
            step.device_key,
            step.child
        )
    };
    match step.strategy {
        MergeStrategy::CommitDown => {
            let point = vol.abs(&step.file);
            // The point's file is about to become the child's: its backing file, written
            // relative to it, must read the same from the child's directory.
            let header = chain::backing(vol, &step.file, deadlines.inspect(capacity)).await?;
            let wanted = step
                .backing_file
                .as_ref()
                .map(|g| vol.backing_string(&step.child_file, g));
            if header.written != wanted {
                return Err(PruneError::Inconsistent(format!(
                    "{} is layered on {:?}, which would not read as {:?} from {}",
                    step.file, header.written, wanted, step.child
                )));
            }
            chain::qemu_img(
                &["commit", "-q", "-d", "-f", "qcow2"],
                &child,
                Some(&child_dir),
                deadlines.merge(capacity),
                what("qemu-img commit"),
            )
            .await?;
            sync(&point)?;
            std::fs::rename(&point, &child).map_err(|source| PruneError::Io {
                path: child.clone(),
                source,
            })?;
            sync(&child_dir)?;
            if let Some(d) = point.parent() {
                sync(d)?;
            }
        }
        MergeStrategy::RebaseUp => {
            let wanted = step
                .backing_file
                .as_ref()
                .map(|g| vol.backing_string(&step.child_file, g));
            // Write-through: qemu-img rewrites the backing file in the header before it
            // writes back its cached cluster tables, so with the default write-back cache a
            // rebase killed after the header change leaves the copied data unreferenced (the
            // child then reads the point's parent where it must read the point: seen in the
            // kill test). Write-through flushes the tables after every write, before the header
            // changes. (The commit needs no such care: the rename that switches comes after
            // qemu-img exited, its tables written.)
            let mut args = vec!["rebase", "-q", "-t", "writethrough", "-f", "qcow2"];
            match &wanted {
                Some(b) => args.extend(["-b", b.as_str(), "-F", "qcow2"]),
                None => args.extend(["-b", ""]),
            }
            chain::qemu_img(
                &args,
                &child,
                Some(&child_dir),
                deadlines.merge(capacity),
                what("qemu-img rebase"),
            )
            .await?;
            sync(&child)?;
        }
    }
    Ok(())
}

/// fsync of a file or directory.
pub fn sync(path: &std::path::Path) -> Result<(), PruneError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| PruneError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(strategy: MergeStrategy, parent: Option<&str>) -> MergeStep {
        MergeStep {
            device_key: 2000,
            child: "vm/c".into(),
            strategy,
            file: "vm/p/2000.qcow2".into(),
            child_file: "vm/c/2000.qcow2".into(),
            backing_file: parent.map(str::to_owned),
            bytes_to_move: 0,
            child_allocated_bytes: 0,
        }
    }

    fn on(path: Option<&str>) -> Backing {
        Backing {
            written: path.map(|p| format!("../{}", p.trim_start_matches("vm/"))),
            resolved: path.map(str::to_owned),
        }
    }

    #[test]
    fn commit_down_is_done_once_the_point_file_took_the_child_place() {
        for parent in [Some("vm/g/2000.qcow2"), None] {
            let s = step(MergeStrategy::CommitDown, parent);
            // Before, or stopped inside the commit: the child is still on the point's file.
            assert_eq!(
                detect(&s, true, &on(Some("vm/p/2000.qcow2"))),
                StepState::Pending
            );
            // Renamed: the child's path holds the point's file, layered on the parent's.
            assert_eq!(detect(&s, false, &on(parent)), StepState::Done);
            // The point's file gone while the child still needs it: data was lost.
            assert!(matches!(
                detect(&s, false, &on(Some("vm/p/2000.qcow2"))),
                StepState::Inconsistent(m) if m.contains("is gone")
            ));
        }
    }

    #[test]
    fn rebase_up_is_done_once_the_child_is_on_the_point_parent() {
        for parent in [Some("vm/g/2000.qcow2"), None] {
            let s = step(MergeStrategy::RebaseUp, parent);
            assert_eq!(
                detect(&s, true, &on(Some("vm/p/2000.qcow2"))),
                StepState::Pending
            );
            assert_eq!(detect(&s, true, &on(parent)), StepState::Done);
            // Done, and the point's files removed after.
            assert_eq!(detect(&s, false, &on(parent)), StepState::Done);
        }
        let s = step(MergeStrategy::RebaseUp, Some("vm/g/2000.qcow2"));
        assert!(matches!(
            detect(&s, true, &on(Some("vm/x/2000.qcow2"))),
            StepState::Inconsistent(_)
        ));
        // A backing file leaving the volume is not "layered on nothing".
        let outside = Backing {
            written: Some("/etc/x.qcow2".into()),
            resolved: None,
        };
        assert!(matches!(
            detect(&step(MergeStrategy::RebaseUp, None), true, &outside),
            StepState::Inconsistent(_)
        ));
    }
}
