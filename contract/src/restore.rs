//! The agent's restore result: printed on stdout and written as the restore pod's termination
//! message (at most 4096 bytes, see [`RestoreResult::compact_json`]) for the operator to read.

use serde::{Deserialize, Serialize};

/// How a restore ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RestoreResult {
    pub ok: bool,
    /// Set when `ok` is false: what went wrong, naming the disk and the fix where there is one.
    pub error: Option<String>,
    /// True when the restore failed before any target was written.
    pub nothing_written: bool,
    /// Why it failed, when the input cannot work as given (retrying does not help).
    pub refused: Option<Refusal>,
    pub seconds: f64,
    pub disks: Vec<RestoredDisk>,
    /// The VM restored into (`restore-vm`).
    pub vm: Option<RestoredVm>,
    /// Set when the result was shrunk to fit a termination message.
    pub truncated: bool,
}

/// The vSphere VM a `restore-vm` wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RestoredVm {
    pub name: String,
    pub moref: String,
    pub instance_uuid: String,
    /// Created by this restore (false: restored in place).
    pub created: bool,
    /// The VM's Changed Block Tracking was reset after the restore (data written into its
    /// flat files is not seen by CBT): its next backup is a full one.
    pub cbt_reset: bool,
}

/// Input a restore or `files get` refuses before writing anything: trying again with the same
/// input fails the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The command line is malformed or inconsistent.
    BadArguments,
    /// A restore point's file or manifest is missing or unreadable as a chain.
    SourceNotFound,
    /// A restore point has no such disk, or no such volume.
    DiskNotFound,
    /// A target (file system, device, export) is smaller than the disk.
    TargetTooSmall,
    /// A target is of the wrong kind (not a directory, not a regular file, read-only).
    TargetUnusable,
    /// A path pattern matched nothing.
    NothingMatched,
    /// No file system Sendense reads was found on the chosen volumes.
    NoFileSystem,
    /// The VM to restore in place is powered on (or suspended).
    VmPoweredOn,
    /// The VM to restore in place does not exist.
    VmNotFound,
    /// The VM to create exists already.
    VmExists,
    /// The VM to restore in place has snapshots: its disks are not flat files to overwrite.
    VmHasSnapshots,
    /// A folder, resource pool or datastore named for the new VM does not exist.
    PlacementNotFound,
    /// A kind this build does not know (an agent newer than the operator).
    #[serde(other)]
    Other,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadArguments => "BadArguments",
            Refusal::SourceNotFound => "SourceNotFound",
            Refusal::DiskNotFound => "DiskNotFound",
            Refusal::TargetTooSmall => "TargetTooSmall",
            Refusal::TargetUnusable => "TargetUnusable",
            Refusal::NothingMatched => "NothingMatched",
            Refusal::NoFileSystem => "NoFileSystem",
            Refusal::VmPoweredOn => "VmPoweredOn",
            Refusal::VmNotFound => "VmNotFound",
            Refusal::VmExists => "VmExists",
            Refusal::VmHasSnapshots => "VmHasSnapshots",
            Refusal::PlacementNotFound => "PlacementNotFound",
            Refusal::Other => "Refused",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Refusal {}

/// One disk of a restore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RestoredDisk {
    pub key: i32,
    /// The target, as given on the command line.
    pub target: String,
    pub capacity: u64,
    /// Bytes the restore covered: the whole disk, or the areas of a rollback.
    pub bytes_total: u64,
    /// Bytes sent as data, as WRITE_ZEROES, and skipped (zeros into a blank target).
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    /// SHA-256 of the target over the disk's capacity, read back after the flush (with
    /// `--expect-sha256`), and whether it matched.
    pub sha256: Option<String>,
    pub verified: Option<bool>,
    /// Bytes read back after the flush and found as written (a rollback's areas).
    pub bytes_verified: Option<u64>,
    /// `restore-vm`: the vSphere disk written (`[datastore] dir/name.vmdk`).
    pub file: Option<String>,
    /// In place: only the blocks changed since the restore point were written (false: the
    /// whole disk, and why in `fullReason`).
    pub differential: Option<bool>,
    pub full_reason: Option<String>,
    pub seconds: f64,
    pub error: Option<String>,
}

impl RestoreResult {
    /// Parses a termination message.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }

    /// The result as JSON of at most `limit` bytes: targets and checksums go first, then the
    /// error is shortened, then the disks go.
    pub fn compact_json(&self, limit: usize) -> String {
        let full = serde_json::to_string(self).unwrap_or_default();
        if full.len() <= limit {
            return full;
        }
        let mut r = self.clone();
        r.truncated = true;
        for d in &mut r.disks {
            d.target.clear();
            d.sha256 = None;
            d.error = d.error.take().map(|e| shorten(&e, 200));
        }
        let s = serde_json::to_string(&r).unwrap_or_default();
        if s.len() <= limit {
            return s;
        }
        r.error = r.error.take().map(|e| shorten(&e, limit / 2));
        r.disks.clear();
        serde_json::to_string(&r).unwrap_or_default()
    }
}

/// How a `files get` ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FilesResult {
    /// True when every selected path was written.
    pub ok: bool,
    pub error: Option<String>,
    /// True when it failed before writing anything (a pattern matched nothing, no file
    /// system could be read, ...).
    pub nothing_written: bool,
    /// Why it failed, when the input cannot work as given (retrying does not help).
    pub refused: Option<Refusal>,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Paths whose owner could not be set (the process may not chown).
    pub ownership_not_set: u64,
    /// Paths that could not be restored, with why (the first 20).
    pub failures: Vec<String>,
    /// How many failed in all.
    pub failed: u64,
}

impl FilesResult {
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }

    /// At most `limit` bytes: failures are dropped from the end, then the error shortened.
    pub fn compact_json(&self, limit: usize) -> String {
        let mut r = self.clone();
        loop {
            let s = serde_json::to_string(&r).unwrap_or_default();
            if s.len() <= limit {
                return s;
            }
            if r.failures.pop().is_none() {
                r.error = r.error.take().map(|e| shorten(&e, limit / 2));
                return serde_json::to_string(&r).unwrap_or_default();
            }
        }
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_results_fit_and_keep_the_outcome() {
        let disk = RestoredDisk {
            key: 2000,
            target: "x".repeat(500),
            sha256: Some("a".repeat(64)),
            error: Some("é".repeat(400)),
            ..Default::default()
        };
        let r = RestoreResult {
            ok: false,
            error: Some("disk 2000: ".to_owned() + &"é".repeat(4000)),
            disks: vec![disk; 20],
            ..Default::default()
        };
        let s = r.compact_json(4096);
        assert!(s.len() <= 4096, "{}", s.len());
        let back = RestoreResult::parse(&s).expect("parses");
        assert!(!back.ok && back.truncated);
        assert!(back.error.unwrap().starts_with("disk 2000: "));
        let small = RestoreResult {
            ok: true,
            ..Default::default()
        };
        assert_eq!(RestoreResult::parse(&small.compact_json(4096)), Some(small));
    }

    #[test]
    fn compact_files_results_drop_failures_first() {
        let r = FilesResult {
            failed: 500,
            failures: (0..20)
                .map(|i| format!("2000:1 /etc/f{i}: {}", "x".repeat(300)))
                .collect(),
            error: Some("500 paths could not be restored".into()),
            ..Default::default()
        };
        let s = r.compact_json(4096);
        assert!(s.len() <= 4096);
        let back = FilesResult::parse(&s).expect("parses");
        assert!(back.failures.len() < 20 && !back.failures.is_empty());
        assert_eq!((back.failed, back.error), (500, r.error));
    }
}
