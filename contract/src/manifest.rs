//! A restore point's manifest: the file that makes a directory of QCOW2 files a committed
//! restore point. The repository volume is the source of truth: the operator rebuilds its
//! RestorePoint objects from these files, so a cluster lost is not a backup lost.
//!
//! One restore point is one directory, `<layout directory>/<job>-<job UID>-a<attempt>/`,
//! holding `<device key>.qcow2` per disk and, once the data is flushed and read back,
//! `restorepoint.json` (this struct), written atomically. A directory without it is an
//! attempt that never finished; no Sendense process writes into, or removes, a directory that
//! has it, except retention (`repo prune`), through the journal it first writes into the
//! manifest ([`Manifest::retention`]).

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a restore point's directory.
pub const MANIFEST_FILE: &str = "restorepoint.json";
/// The version this build writes; a reader refuses a newer one rather than misread it.
pub const MANIFEST_VERSION: u32 = 1;

/// What one committed restore point holds. Paths are relative to the volume's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    /// The BackupJob that made it: its UID is the restore point's identity (a job name can be
    /// reused; a UID cannot).
    pub job: JobIdentity,
    /// The attempt of the job whose files these are.
    pub attempt: i32,
    /// The Repository and SourceNode (names in the job's namespace) it was made through.
    pub repository: String,
    pub source_node: String,
    /// The vCenter's SDK URL.
    pub vcenter: String,
    pub vm: VmIdentity,
    /// The snapshot the data was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotIdentity>,
    /// The restore point the incremental disks are layered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentIdentity>,
    /// The restore point's directory.
    pub directory: String,
    /// When the job started (RFC 3339).
    pub started: String,
    /// When the copy completed: the data was flushed (RFC 3339). The restore point's time.
    pub completed: String,
    /// The scheduled time of the BackupSchedule run that made it (RFC 3339), when a schedule
    /// did. Retention files the point under this time, so a run that queued past midnight
    /// still counts for its own day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<String>,
    pub disks: Vec<ManifestDisk>,
    /// Retention's journal: set when `repo prune` started merging this point out of its chain,
    /// before it touched any file. From that moment the directory is no longer a restore point
    /// anyone may read (its files are being merged into its children's, or renamed over them):
    /// listings report it as being pruned, restores refuse it, and only `repo prune` of the
    /// same point (which finishes the job from this journal) touches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionJournal>,
}

/// Where a prune of the point is: its decisions, recorded before any file was touched, so that
/// a prune run again after a crash finishes the same job instead of deciding anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionJournal {
    pub state: RetentionState,
    /// When the prune started (RFC 3339).
    pub started: String,
    /// The committed restore points layered on this one (their directories): every one gets
    /// a new parent, whether or not one of its disks needs a merge step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Space the point's own files took (allocated, not apparent) when the prune started.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// One merge per disk and child whose file is layered on this point's file of the disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<MergeStep>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RetentionState {
    /// The children's files are being made independent of this point's files; then their
    /// manifests are updated and this point's files, manifest and directory removed.
    Merging,
}

/// How one child's disk stops depending on the pruned point's file of that disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MergeStrategy {
    /// The child's own data is committed into the point's file (`qemu-img commit -d`), which
    /// is then renamed over the child's file: the child's layer becomes the point's file plus
    /// the child's data. Only for the point's only child of the disk.
    CommitDown,
    /// The child's file is rebased onto the point's parent's file (or onto nothing), copying
    /// into it what the point held that the child does not (`qemu-img rebase`, safe mode).
    RebaseUp,
}

/// One disk of one child, and how it is merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeStep {
    pub device_key: i32,
    /// The child's directory.
    pub child: String,
    pub strategy: MergeStrategy,
    /// The pruned point's file of the disk.
    pub file: String,
    /// The child's file of the disk.
    pub child_file: String,
    /// The pruned point's parent's file of the disk: the child's backing file once merged
    /// (absent: the child's file stands alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Data the strategy moves, measured from the layers' own allocations when planned.
    pub bytes_to_move: u64,
    /// Space the child's file took when the prune started (its growth is subtracted from
    /// what the prune frees).
    #[serde(default)]
    pub child_allocated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A parent restore point: its RestorePoint name and its directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentIdentity {
    pub name: String,
    pub directory: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmIdentity {
    /// The VM's name in vCenter at the time of the backup.
    pub name: String,
    /// vSphere's instance UUID of the VM: which VM this is, whatever its name.
    pub instance_uuid: String,
    /// Its virtual hardware at the backup (absent in manifests written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<VmHardware>,
}

/// A VM's virtual hardware: what a restore to a new VM recreates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmHardware {
    pub cpus: i32,
    pub memory_mib: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotIdentity {
    pub id: String,
    pub name: String,
}

/// Full copy or changes since the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCopy {
    Full,
    Incremental,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDisk {
    pub device_key: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// This disk's QCOW2 file.
    pub file: String,
    /// The parent restore point's file of this disk (the QCOW2 backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    pub capacity_bytes: u64,
    pub copy: DiskCopy,
    /// The CBT change ID the copy started from (incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id_used: Option<String>,
    /// The change ID the data is complete up to: the next incremental starts here.
    pub change_id_reached: String,
    /// Bytes written into this file (data; zeroed ranges not counted).
    pub bytes_written: u64,
    /// SHA-256 (hex) of the whole disk as this restore point restores it (the QCOW2 read
    /// through its backing chain), computed by the commit from the flushed files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Bytes the agent read back from the hub after the flush and found as the source gave
    /// them (every chunk it copied); absent when the copy was not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_verified: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    Json(String),
    Version(u32),
    Invalid(String),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(e) => write!(f, "not a restore point manifest: {e}"),
            Self::Version(v) => write!(
                f,
                "manifest version {v} is newer than this build reads ({MANIFEST_VERSION}): upgrade Sendense"
            ),
            Self::Invalid(e) => write!(f, "invalid restore point manifest: {e}"),
        }
    }
}

impl std::error::Error for ManifestError {}

/// True for a path relative to the volume root that stays inside it.
fn inside(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

impl Manifest {
    /// Reads and checks a manifest.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let m: Self = serde_json::from_str(text).map_err(|e| ManifestError::Json(e.to_string()))?;
        if m.version > MANIFEST_VERSION {
            return Err(ManifestError::Version(m.version));
        }
        m.check()?;
        Ok(m)
    }

    /// What every manifest must hold: an identity, a directory inside the volume, and disks
    /// whose files are in that directory.
    pub fn check(&self) -> Result<(), ManifestError> {
        let bad = |e: String| Err(ManifestError::Invalid(e));
        if self.job.uid.is_empty() {
            return bad("job.uid is empty".into());
        }
        if self.vm.instance_uuid.is_empty() {
            return bad("vm.instanceUuid is empty".into());
        }
        if !inside(&self.directory) {
            return bad(format!(
                "directory {:?} is not a relative path inside the volume",
                self.directory
            ));
        }
        if self.disks.is_empty() {
            return bad("no disks".into());
        }
        for d in &self.disks {
            let in_dir = d
                .file
                .strip_prefix(&self.directory)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|name| !name.is_empty() && !name.contains('/'));
            if !inside(&d.file) || !in_dir {
                return bad(format!(
                    "disk {}: file {:?} is not in the directory {:?}",
                    d.device_key, d.file, self.directory
                ));
            }
            if let Some(b) = &d.backing_file
                && !inside(b)
            {
                return bad(format!(
                    "disk {}: backing file {b:?} is not inside the volume",
                    d.device_key
                ));
            }
            if d.change_id_reached.is_empty() {
                return bad(format!("disk {}: no change ID reached", d.device_key));
            }
        }
        if let Some(r) = &self.retention {
            for c in &r.children {
                if !inside(c) {
                    return bad(format!("retention: child {c:?} is not inside the volume"));
                }
            }
            for s in &r.steps {
                let paths = [Some(&s.child), Some(&s.child_file), s.backing_file.as_ref()];
                if let Some(p) = paths.into_iter().flatten().find(|p| !inside(p)) {
                    return bad(format!("retention: {p:?} is not inside the volume"));
                }
                if !self
                    .disks
                    .iter()
                    .any(|d| d.device_key == s.device_key && d.file == s.file)
                {
                    return bad(format!(
                        "retention: step of disk {} names {:?}, not one of the point's files",
                        s.device_key, s.file
                    ));
                }
            }
        }
        Ok(())
    }

    /// True once `repo prune` journalled this point: it is not a restore point to read.
    pub fn being_pruned(&self) -> bool {
        self.retention.is_some()
    }

    /// The manifest's path relative to the volume root.
    pub fn path(&self) -> String {
        format!("{}/{MANIFEST_FILE}", self.directory)
    }

    /// Full when any disk was copied in full, else incremental.
    pub fn copy(&self) -> DiskCopy {
        if self.disks.iter().any(|d| d.copy == DiskCopy::Full) {
            DiskCopy::Full
        } else {
            DiskCopy::Incremental
        }
    }

    /// Bytes written into the restore point's files.
    pub fn bytes_written(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes_written).sum()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a manifest serialises")
    }
}

/// What `sendense-agent repo commit` reports: the digests it computed, per disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CommitResult {
    pub ok: bool,
    /// The manifest's path, relative to the volume root.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub manifest: String,
    /// True when the manifest was already there for this job and attempt (a repeated commit).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<CommittedDisk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommittedDisk {
    pub device_key: i32,
    pub sha256: String,
}

impl CommitResult {
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
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

    pub fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            job: JobIdentity {
                namespace: "backups".into(),
                name: "web-1".into(),
                uid: "0f1e2d3c-0000-4000-8000-000000000001".into(),
            },
            attempt: 1,
            repository: "primary".into(),
            source_node: "vc".into(),
            vcenter: "https://vc.example.com/sdk".into(),
            vm: VmIdentity {
                name: "web".into(),
                instance_uuid: "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into(),
                hardware: None,
            },
            snapshot: Some(SnapshotIdentity {
                id: "snapshot-7".into(),
                name: "sendense-web-1".into(),
            }),
            parent: None,
            directory: "backups/web/web-1-0f1e2d3c-0000-4000-8000-000000000001-a1".into(),
            started: "2026-11-25T10:00:00Z".into(),
            completed: "2026-11-25T10:05:00Z".into(),
            scheduled: None,
            disks: vec![ManifestDisk {
                device_key: 2000,
                label: "Hard disk 1".into(),
                file: "backups/web/web-1-0f1e2d3c-0000-4000-8000-000000000001-a1/2000.qcow2".into(),
                backing_file: None,
                capacity_bytes: 1 << 30,
                copy: DiskCopy::Full,
                change_id_used: None,
                change_id_reached: "52 aa/3".into(),
                bytes_written: 4096,
                sha256: String::new(),
                bytes_verified: Some(4096),
            }],
            retention: None,
        }
    }

    #[test]
    fn a_manifest_round_trips_and_is_checked() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_json()), Ok(m.clone()));
        assert!(m.to_json().contains("\"instanceUuid\""));
        assert_eq!(m.copy(), DiskCopy::Full);
        assert_eq!(
            m.path(),
            "backups/web/web-1-0f1e2d3c-0000-4000-8000-000000000001-a1/restorepoint.json"
        );
    }

    #[test]
    fn a_manifest_naming_files_outside_its_directory_or_newer_is_refused() {
        let mut m = sample();
        m.disks[0].file = "backups/web/other/2000.qcow2".into();
        assert!(
            matches!(m.check(), Err(ManifestError::Invalid(e)) if e.contains("not in the directory"))
        );
        let mut m = sample();
        m.directory = "../x".into();
        assert!(m.check().is_err());
        let mut m = sample();
        m.disks[0].backing_file = Some("/etc/passwd".into());
        assert!(m.check().is_err());
        let mut m = sample();
        m.disks[0].change_id_reached.clear();
        assert!(m.check().is_err());
        let mut m = sample();
        m.version = MANIFEST_VERSION + 1;
        assert_eq!(
            Manifest::parse(&m.to_json()),
            Err(ManifestError::Version(MANIFEST_VERSION + 1))
        );
        assert!(matches!(Manifest::parse("{}"), Err(ManifestError::Json(_))));
    }

    #[test]
    fn a_journalled_manifest_round_trips_and_its_steps_are_checked() {
        let mut m = sample();
        assert!(!m.being_pruned() && !m.to_json().contains("retention"));
        let step = MergeStep {
            device_key: 2000,
            child: "backups/web/web-2-u-a1".into(),
            strategy: MergeStrategy::CommitDown,
            file: m.disks[0].file.clone(),
            child_file: "backups/web/web-2-u-a1/2000.qcow2".into(),
            backing_file: None,
            bytes_to_move: 1 << 20,
            child_allocated_bytes: 2 << 20,
        };
        m.retention = Some(RetentionJournal {
            state: RetentionState::Merging,
            started: "2026-11-26T10:00:00Z".into(),
            children: vec![step.child.clone()],
            allocated_bytes: 1 << 30,
            steps: vec![step],
        });
        let json = m.to_json();
        assert!(json.contains(r#""retention":{"state":"merging""#), "{json}");
        assert!(json.contains(r#""strategy":"commitDown""#), "{json}");
        assert_eq!(Manifest::parse(&json), Ok(m.clone()));
        assert!(m.being_pruned());
        let mut bad = m.clone();
        bad.retention.as_mut().unwrap().steps[0].file = "backups/web/x/2000.qcow2".into();
        assert!(bad.check().is_err());
        let mut bad = m;
        bad.retention.as_mut().unwrap().steps[0].child_file = "../2000.qcow2".into();
        assert!(bad.check().is_err());
    }
}
