//! What `sendense-agent repo probe` reports: whether a repository volume is writable, and how
//! full it is.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::reason::ProbeReason;

/// On failure only `ok`, `reason` and `error` are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_files: Option<u64>,
    /// Space allocated to the QCOW2 files (not their apparent size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_bytes: Option<u64>,
    /// Restore point manifests found (`--list-manifests`; each printed on a line of its own),
    /// those being pruned not counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_points: Option<u64>,
    /// Manifests of points being pruned (`--list-manifests`): listed with `beingPruned`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points_being_pruned: Option<u64>,
    /// Manifests that could not be read, each with its path and why (at most 10).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_manifests: Vec<String>,
    /// Orphaned attempt directories removed (`--remove-orphan`), relative to the volume's root.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_orphans: Vec<String>,
    /// Orphaned attempt directories asked for and not removed, each with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_orphans: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ProbeReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeResult {
    pub fn failed(reason: ProbeReason, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason: Some(reason),
            error: Some(error.into()),
            ..Default::default()
        }
    }

    /// Reads a result (a termination message); `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }
}

/// A line of `repo probe --list-manifests` output (stdout, before the result): one committed
/// restore point on the volume, or one being pruned. The operator reads these from the probe
/// pod's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FoundManifest {
    pub restore_point: Manifest,
    /// `repo prune` journalled the point (its manifest holds `retention`): it is being merged
    /// out of its chain and is no longer a restore point to read, rediscover or restore.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub being_pruned: bool,
}

impl FoundManifest {
    pub fn new(restore_point: Manifest) -> Self {
        Self {
            being_pruned: restore_point.being_pruned(),
            restore_point,
        }
    }

    /// The restore points among a log's lines (points being pruned left out); other lines
    /// are skipped.
    pub fn from_log(log: &str) -> Vec<Manifest> {
        Self::found(log)
            .filter(|f| !f.being_pruned && !f.restore_point.being_pruned())
            .map(|f| f.restore_point)
            .collect()
    }

    /// The directories of the points being pruned among a log's lines.
    pub fn being_pruned_from_log(log: &str) -> Vec<String> {
        Self::found(log)
            .filter(|f| f.being_pruned || f.restore_point.being_pruned())
            .map(|f| f.restore_point.directory)
            .collect()
    }

    fn found(log: &str) -> impl Iterator<Item = FoundManifest> + '_ {
        log.lines()
            .filter_map(|l| serde_json::from_str::<FoundManifest>(l.trim()).ok())
            .filter(|f| f.restore_point.check().is_ok())
    }
}

/// A line of `repo probe --list-manifests` output: a directory holding an attempt's files and
/// no manifest (an attempt that did not commit, or one still running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FoundUncommitted {
    pub uncommitted: UncommittedDir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UncommittedDir {
    /// Relative to the volume's root.
    pub dir: String,
    /// Seconds since anything in it (or the directory itself) was last modified.
    pub idle_seconds: u64,
    /// Space its files take.
    pub bytes: u64,
}

impl FoundUncommitted {
    /// The uncommitted directories among a log's lines; other lines are skipped.
    pub fn from_log(log: &str) -> Vec<UncommittedDir> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<FoundUncommitted>(l.trim()).ok())
            .map(|f| f.uncommitted)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &str) -> Manifest {
        Manifest::parse(
            &serde_json::json!({
                "version": 1, "job": {"namespace": "ns", "name": "j", "uid": "u"},
                "attempt": 1, "repository": "r", "sourceNode": "vc", "vcenter": "https://vc/sdk",
                "vm": {"name": "vm", "instanceUuid": "i"}, "directory": dir,
                "started": "2026-11-25T10:00:00Z", "completed": "2026-11-25T10:05:00Z",
                "disks": [{"deviceKey": 2000, "file": format!("{dir}/2000.qcow2"),
                           "capacityBytes": 1, "copy": "full", "changeIdReached": "c",
                           "bytesWritten": 0}]
            })
            .to_string(),
        )
        .expect("manifest")
    }

    #[test]
    fn points_being_pruned_are_listed_apart_from_restore_points() {
        let kept = manifest("ns/vm/a");
        let mut pruned = manifest("ns/vm/b");
        pruned.retention = Some(crate::manifest::RetentionJournal {
            state: crate::manifest::RetentionState::Merging,
            started: "2026-11-26T10:00:00Z".into(),
            children: Vec::new(),
            allocated_bytes: 0,
            steps: Vec::new(),
        });
        let log = [kept.clone(), pruned]
            .into_iter()
            .map(|m| serde_json::to_string(&FoundManifest::new(m)).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(log.contains(r#""beingPruned":true"#), "{log}");
        assert_eq!(log.matches("beingPruned").count(), 1, "{log}");
        assert_eq!(FoundManifest::from_log(&log), vec![kept]);
        assert_eq!(FoundManifest::being_pruned_from_log(&log), vec!["ns/vm/b"]);
    }
}
