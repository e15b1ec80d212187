//! What `sendense-agent repo prune` reports: the merge of one restore point out of its chain
//! (planned, or done), on stdout and in `--result-file`.

use serde::{Deserialize, Serialize};

use crate::manifest::MergeStrategy;

/// How a prune ended. `ok` is true when the point is gone (or, with `--dry-run`, when it
/// could be pruned: `steps` is the plan).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PruneResult {
    pub ok: bool,
    /// The point, as given (relative to the volume's root).
    pub point: String,
    /// Nothing was written: a plan only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The point was already gone and no restore point names it as its parent: nothing to do.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
    /// The point's journal was there: an earlier prune's decisions were carried out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// True when it failed before writing anything.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nothing_written: bool,
    /// Why, when the input cannot work as given (running it again does not help).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<PruneRefusal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The restore points that were layered on the point (their directories).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// One merge per disk and child.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<PruneStep>,
    /// Data the merges moved (planned, with `--dry-run`).
    pub bytes_moved: u64,
    /// Space freed: the point's files' allocated bytes minus the growth of its children's
    /// files (estimated from the layers' maps with `--dry-run`). Negative when the children
    /// grew by more than the point held.
    pub bytes_freed: i64,
    pub seconds: f64,
}

/// One disk of one child.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PruneStep {
    pub device_key: i32,
    /// The child's directory.
    pub child: String,
    pub strategy: Option<MergeStrategy>,
    pub bytes_to_move: u64,
    /// Found done (by an earlier, interrupted run), not done again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub found_done: bool,
    /// The child's disk read through its new chain hashed as its manifest records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Time the merge took in this run.
    pub seconds: f64,
}

/// Input a prune refuses before writing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PruneRefusal {
    /// The command line is malformed.
    BadArguments,
    /// `--point` is not a directory inside `--root`.
    NotInsideRoot,
    /// The directory holds files but no readable manifest: an attempt that did not commit (or
    /// one still running), not a restore point.
    NotARestorePoint,
    /// An uncommitted attempt's file is layered on the point's file: a backup is being made
    /// on it.
    BackupInFlight,
    /// The files on the volume do not match what the manifests say (a backing file that is
    /// not the recorded one, a file missing, a child without a recorded SHA-256).
    ChainInconsistent,
    /// A neighbouring point (parent or child) is being pruned: that prune must finish first.
    NeighbourBeingPruned,
    /// A kind this build does not know (an agent newer than the operator).
    #[serde(other)]
    Other,
}

impl PruneRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            PruneRefusal::BadArguments => "BadArguments",
            PruneRefusal::NotInsideRoot => "NotInsideRoot",
            PruneRefusal::NotARestorePoint => "NotARestorePoint",
            PruneRefusal::BackupInFlight => "BackupInFlight",
            PruneRefusal::ChainInconsistent => "ChainInconsistent",
            PruneRefusal::NeighbourBeingPruned => "NeighbourBeingPruned",
            PruneRefusal::Other => "Refused",
        }
    }
}

impl std::fmt::Display for PruneRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PruneResult {
    /// A prune refused before anything was written.
    pub fn refused(point: &str, kind: PruneRefusal, error: impl Into<String>) -> Self {
        Self {
            point: point.to_owned(),
            nothing_written: true,
            refused: Some(kind),
            error: Some(error.into()),
            ..Default::default()
        }
    }

    /// Reads a result (a termination message); `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_back_and_an_unknown_one_is_other() {
        let r = PruneResult::refused("ns/vm/p", PruneRefusal::BackupInFlight, "busy");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""refused":"BackupInFlight""#), "{json}");
        assert!(json.contains(r#""nothingWritten":true"#), "{json}");
        assert_eq!(PruneResult::parse(&json), Some(r));
        let r: PruneRefusal = serde_json::from_str("\"QuantumFault\"").unwrap();
        assert_eq!(r, PruneRefusal::Other);
    }
}
