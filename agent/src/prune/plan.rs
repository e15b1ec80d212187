//! Before anything is written: the point's neighbours on the volume (its children, its parent,
//! a backup in flight on it), the refusals, and the merge per disk and child.

use std::collections::BTreeSet;

use sendense_contract::manifest::{
    MANIFEST_FILE, Manifest, MergeStep, RetentionJournal, RetentionState,
};
use sendense_contract::prune::{PruneRefusal, PruneResult, PruneStep};

use super::chain::{self, Deadlines, Volume};
use super::choose::{self, ChildLayer};
use super::{PruneError, refused};

/// What the volume holds around the point.
#[derive(Debug, Default)]
pub struct Neighbours {
    /// Committed points layered on it (by their manifest's parent, or a disk's backing file).
    pub children: Vec<Manifest>,
    /// Its parent's manifest is a journal too.
    parent_being_pruned: bool,
    /// Files of directories without a readable manifest layered on one of its files: (the
    /// directory, the file, whether it has a manifest that cannot be read).
    layered_uncommitted: Vec<(String, String, bool)>,
}

impl Neighbours {
    pub async fn scan(
        vol: &Volume,
        point: &Manifest,
        deadlines: &Deadlines,
    ) -> Result<Self, PruneError> {
        let walked = crate::repo::walk(&vol.root).map_err(PruneError::Scan)?;
        let files: BTreeSet<&str> = point.disks.iter().map(|d| d.file.as_str()).collect();
        let parent_dir = point.parent.as_ref().map(|p| p.directory.as_str());
        let mut found = Self::default();
        let mut unknown_dirs: Vec<(String, bool)> = walked
            .uncommitted
            .iter()
            .map(|u| (u.dir.clone(), false))
            .collect();
        for path in &walked.manifests {
            let m = match std::fs::read_to_string(path)
                .ok()
                .and_then(|t| Manifest::parse(&t).ok())
            {
                Some(m) => m,
                None => {
                    if let Some(dir) = path.parent().and_then(|d| vol.rel(d)) {
                        unknown_dirs.push((dir, true));
                    }
                    continue;
                }
            };
            if m.directory == point.directory {
                continue;
            }
            if Some(m.directory.as_str()) == parent_dir {
                found.parent_being_pruned = m.being_pruned();
            }
            let layered = m
                .parent
                .as_ref()
                .is_some_and(|p| p.directory == point.directory)
                || m.disks
                    .iter()
                    .any(|d| d.backing_file.as_deref().is_some_and(|b| files.contains(b)));
            if layered {
                found.children.push(m);
            }
        }
        let deadline = deadlines.inspect(0);
        for (dir, unreadable) in unknown_dirs {
            let Ok(entries) = std::fs::read_dir(vol.abs(&dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".qcow2") {
                    continue;
                }
                let file = format!("{dir}/{name}");
                let b = chain::backing(vol, &file, deadline).await?;
                if b.resolved.as_deref().is_some_and(|r| files.contains(r)) {
                    found
                        .layered_uncommitted
                        .push((dir.clone(), file, unreadable));
                }
            }
        }
        found.children.sort_by(|a, b| a.directory.cmp(&b.directory));
        Ok(found)
    }

    /// A backup in flight on the point, an unreadable manifest on it, a neighbour being pruned.
    pub fn refusals(&self, point: &Manifest) -> Result<(), PruneError> {
        let p = &point.directory;
        if let Some((dir, file, unreadable)) = self.layered_uncommitted.first() {
            return Err(if *unreadable {
                refused(
                    PruneRefusal::ChainInconsistent,
                    format!(
                        "{file} is layered on {p}, but {dir}/{MANIFEST_FILE} cannot be read: a restore point that cannot be checked is never merged; fix or upgrade, then prune {p} again"
                    ),
                )
            } else {
                refused(
                    PruneRefusal::BackupInFlight,
                    format!(
                        "a backup is in flight on {p}: {file} (no manifest yet) is layered on it; prune {p} once that backup has committed, or once its failed attempt {dir} is removed (`repo probe --remove-orphan {dir}`)"
                    ),
                )
            });
        }
        if self.parent_being_pruned {
            let parent = point.parent.as_ref().map_or("", |x| x.directory.as_str());
            return Err(refused(
                PruneRefusal::NeighbourBeingPruned,
                format!(
                    "the parent of {p}, {parent}, is being pruned: run `repo prune --point {parent}` to finish it first, then prune {p}"
                ),
            ));
        }
        if let Some(c) = self.children.iter().find(|c| c.being_pruned()) {
            return Err(refused(
                PruneRefusal::NeighbourBeingPruned,
                format!(
                    "{}, layered on {p}, is being pruned: run `repo prune --point {}` to finish it first, then prune {p}",
                    c.directory, c.directory
                ),
            ));
        }
        Ok(())
    }
}

/// The journal to write, and what the dry run reports.
#[derive(Debug)]
pub struct Planned {
    pub journal: RetentionJournal,
    /// What the children's files grow by, per step (estimated from the maps).
    growth: Vec<u64>,
}

impl Planned {
    pub fn dry_run_result(&self, point: String) -> PruneResult {
        let growth: u64 = self.growth.iter().sum();
        PruneResult {
            ok: true,
            point,
            dry_run: true,
            nothing_written: true,
            children: self.journal.children.clone(),
            steps: self
                .journal
                .steps
                .iter()
                .map(|s| PruneStep {
                    device_key: s.device_key,
                    child: s.child.clone(),
                    strategy: Some(s.strategy),
                    bytes_to_move: s.bytes_to_move,
                    ..Default::default()
                })
                .collect(),
            bytes_moved: self.journal.steps.iter().map(|s| s.bytes_to_move).sum(),
            bytes_freed: self.journal.allocated_bytes as i64 - growth as i64,
            ..Default::default()
        }
    }
}

/// Per disk of the point, the merge of each child whose file of the disk is layered on the
/// point's; the files are checked against the manifests on the way.
pub async fn plan(
    vol: &Volume,
    point: &Manifest,
    children: &[Manifest],
    deadlines: &Deadlines,
    started: String,
) -> Result<Planned, PruneError> {
    let p = &point.directory;
    let inconsistent = |m: String| refused(PruneRefusal::ChainInconsistent, m);
    let mut steps = Vec::new();
    let mut growth = Vec::new();
    let mut allocated = 0;
    for d in &point.disks {
        let deadline = deadlines.inspect(d.capacity_bytes);
        if !vol.abs(&d.file).is_file() {
            return Err(inconsistent(format!(
                "{p}: disk {}'s file {} is missing",
                d.device_key, d.file
            )));
        }
        allocated += chain::allocated(&vol.abs(&d.file));
        let header = chain::backing(vol, &d.file, deadline).await?;
        if header.resolved != d.backing_file
            || (d.backing_file.is_none() && header.written.is_some())
        {
            return Err(inconsistent(format!(
                "{p}: {} is layered on {:?}, its manifest says {:?}",
                d.file, header.written, d.backing_file
            )));
        }
        let mut dependents = Vec::new();
        for c in children {
            let Some(cd) = c
                .disks
                .iter()
                .find(|cd| cd.backing_file.as_deref() == Some(d.file.as_str()))
            else {
                continue;
            };
            let child_header = chain::backing(vol, &cd.file, deadline).await?;
            if child_header.resolved.as_deref() != Some(d.file.as_str()) {
                return Err(inconsistent(format!(
                    "{}: {} is layered on {:?}, its manifest says {}",
                    c.directory, cd.file, child_header.written, d.file
                )));
            }
            if cd.device_key != d.device_key || cd.sha256.is_empty() {
                return Err(inconsistent(format!(
                    "{}: disk {} (layered on {}) has no SHA-256 recorded or another device key: its merge could not be verified",
                    c.directory, cd.device_key, d.file
                )));
            }
            let (present, data) = chain::layer(vol, &cd.file, deadline).await?;
            dependents.push((c, cd, ChildLayer { present, data }));
        }
        if dependents.is_empty() {
            continue;
        }
        let (_, point_data) = chain::layer(vol, &d.file, deadline).await?;
        // The point's file can take an only child's place when its backing file, written
        // relative to it, reads the same from the child's directory (points of one VM share
        // a layout directory, so it does unless the layout changed between them).
        let commit_down_allowed = match &d.backing_file {
            None => true,
            Some(g) => {
                dependents.len() == 1
                    && header.written.as_deref()
                        == Some(vol.backing_string(&dependents[0].1.file, g).as_str())
            }
        };
        let layers: Vec<ChildLayer> = dependents.iter().map(|(_, _, l)| l.clone()).collect();
        let choices = choose::choose(&point_data, &layers, commit_down_allowed);
        for ((c, cd, _), choice) in dependents.iter().zip(choices) {
            steps.push(MergeStep {
                device_key: d.device_key,
                child: c.directory.clone(),
                strategy: choice.strategy,
                file: d.file.clone(),
                child_file: cd.file.clone(),
                backing_file: d.backing_file.clone(),
                bytes_to_move: choice.bytes_to_move,
                child_allocated_bytes: chain::allocated(&vol.abs(&cd.file)),
            });
            growth.push(choice.growth);
        }
    }
    Ok(Planned {
        journal: RetentionJournal {
            state: RetentionState::Merging,
            started,
            children: children.iter().map(|c| c.directory.clone()).collect(),
            allocated_bytes: allocated,
            steps,
        },
        growth,
    })
}
