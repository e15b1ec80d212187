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
    /// Restore point manifests found (`--list-manifests`; each printed on a line of its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_points: Option<u64>,
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
/// restore point on the volume. The operator reads these from the probe pod's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FoundManifest {
    pub restore_point: Manifest,
}

impl FoundManifest {
    /// The manifests among a log's lines; other lines are skipped.
    pub fn from_log(log: &str) -> Vec<Manifest> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<FoundManifest>(l.trim()).ok())
            .map(|f| f.restore_point)
            .filter(|m| m.check().is_ok())
            .collect()
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
