//! The agent's live progress: what `GET /progress` on `backup --status-addr` answers.

use serde::{Deserialize, Serialize};

/// The path the status endpoint serves the report on.
pub const PROGRESS_PATH: &str = "/progress";

/// Where a backup is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Connecting to vCenter, finding the VM, checking its disks and CBT.
    #[default]
    Connecting,
    /// Removing leftover snapshots and taking the backup's snapshot.
    Snapshot,
    Copying,
    RemovingSnapshot,
    /// Finished, whatever the outcome.
    Done,
    /// A stage this build does not know (an agent newer than the operator).
    #[serde(other)]
    Unknown,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connecting => "connecting",
            Stage::Snapshot => "snapshot",
            Stage::Copying => "copying",
            Stage::RemovingSnapshot => "removing-snapshot",
            Stage::Done => "done",
            Stage::Unknown => "unknown",
        }
    }

    /// Before the copy: nothing to count yet.
    pub fn is_preparing(self) -> bool {
        matches!(self, Stage::Connecting | Stage::Snapshot)
    }
}

/// One disk in a [`ProgressReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskProgress {
    pub key: i32,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
    /// Read back from the hub after the flush and found as the source gave them.
    pub bytes_verified: u64,
}

/// The stage and every disk's counters (camelCase: it goes into Kubernetes status as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProgressReport {
    pub stage: Stage,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
    pub disks: Vec<DiskProgress>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_reads_back_as_written() {
        let r = ProgressReport {
            stage: Stage::RemovingSnapshot,
            bytes_to_copy: 10,
            bytes_copied: 4,
            disks: vec![DiskProgress {
                key: 2000,
                bytes_to_copy: 10,
                bytes_copied: 4,
                bytes_verified: 0,
            }],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"stage":"removing-snapshot","bytesToCopy":10,"bytesCopied":4,"disks":[{"key":2000,"bytesToCopy":10,"bytesCopied":4,"bytesVerified":0}]}"#
        );
        assert_eq!(serde_json::from_str::<ProgressReport>(&json).unwrap(), r);
        let newer: ProgressReport = serde_json::from_str(r#"{"stage":"verifying"}"#).unwrap();
        assert_eq!(newer.stage, Stage::Unknown);
    }
}
