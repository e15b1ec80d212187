//! Committing a restore point (`repo commit`): an attempt's directory of flushed QCOW2 files
//! becomes a restore point once its manifest is there. Before writing it, each disk is read
//! back through its backing chain (a chain that does not open, or a parent that is not the one
//! planned, fails the commit) and its SHA-256 goes into the manifest; the files are fsynced.
//! The manifest is written beside them without ever replacing one: a temporary file, fsync,
//! a hard link to `restorepoint.json` (which fails if the name exists), fsync of the directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendense_contract::manifest::{
    CommitResult, CommittedDisk, MANIFEST_FILE, Manifest, ManifestError,
};

use crate::checksum;
use crate::hub;
use crate::nbd::{ConnectOptions, NbdClient, NbdError};
use crate::qemu_nbd::{QemuNbdError, ReadOnlyExport};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0} does not exist: the attempt's directory is gone")]
    NoDirectory(PathBuf),
    #[error(
        "{path} already holds the restore point of job {uid} attempt {attempt}: a manifest is never replaced"
    )]
    Taken {
        path: PathBuf,
        uid: String,
        attempt: i32,
    },
    #[error("disk {key}: {file} is missing")]
    MissingFile { key: i32, file: PathBuf },
    #[error("disk {key}: {file} is layered on {found:?}, but the plan named {planned:?}")]
    WrongParent {
        key: i32,
        file: PathBuf,
        found: Option<PathBuf>,
        planned: Option<PathBuf>,
    },
    #[error("disk {key}: {source}")]
    Image {
        key: i32,
        #[source]
        source: hub::HubError,
    },
    #[error("disk {key}: reading the chain back: {source}")]
    Export {
        key: i32,
        #[source]
        source: QemuNbdError,
    },
    #[error("disk {key}: reading the chain back: {source}")]
    Read {
        key: i32,
        #[source]
        source: NbdError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CommitError + '_ {
    move |source| CommitError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Seconds each NBD read of the read-back may take.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Commits the restore point `manifest` (JSON, without digests) describes, under `root`.
pub async fn commit(root: &Path, manifest: &str) -> Result<CommitResult, CommitError> {
    let mut m = Manifest::parse(manifest)?;
    if m.retention.is_some() {
        return Err(ManifestError::Invalid(
            "a manifest to commit holds a retention journal: only `repo prune` writes one".into(),
        )
        .into());
    }
    let dir = root.join(&m.directory);
    if !dir.is_dir() {
        return Err(CommitError::NoDirectory(dir));
    }
    let target = dir.join(MANIFEST_FILE);
    if let Some(done) = already_committed(&target, &m)? {
        return Ok(done);
    }
    for d in m.disks.iter_mut() {
        let file = root.join(&d.file);
        if !file.is_file() {
            return Err(CommitError::MissingFile {
                key: d.device_key,
                file,
            });
        }
        check_parent(root, &file, d.device_key, d.backing_file.as_deref())?;
        // The hub flushed at the agent's request and closed the image when it stopped; this
        // makes the data durable before anything says it is a restore point.
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(io(&file))?;
        d.sha256 = read_back(&file, d.device_key).await?;
    }
    write_new(&dir, &target, &m.to_json())?;
    Ok(result(&m, false))
}

fn result(m: &Manifest, already: bool) -> CommitResult {
    CommitResult {
        ok: true,
        manifest: m.path(),
        already,
        disks: m
            .disks
            .iter()
            .map(|d| CommittedDisk {
                device_key: d.device_key,
                sha256: d.sha256.clone(),
            })
            .collect(),
        error: None,
    }
}

/// The manifest already there: this job's and attempt's (a repeated commit, e.g. after the
/// operator restarted) is the answer; another's is an error.
fn already_committed(target: &Path, m: &Manifest) -> Result<Option<CommitResult>, CommitError> {
    let text = match std::fs::read_to_string(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(io(target))?,
    };
    let there = Manifest::parse(&text)?;
    if there.job.uid == m.job.uid && there.attempt == m.attempt {
        return Ok(Some(result(&there, true)));
    }
    Err(CommitError::Taken {
        path: target.to_owned(),
        uid: there.job.uid,
        attempt: there.attempt,
    })
}

/// The image's backing file is the one planned (both resolved to real paths).
fn check_parent(
    root: &Path,
    file: &Path,
    key: i32,
    planned: Option<&str>,
) -> Result<(), CommitError> {
    let info = hub::info(file).map_err(|source| CommitError::Image { key, source })?;
    let dir = file.parent().unwrap_or(root);
    let real = |p: PathBuf| p.canonicalize().unwrap_or(p);
    let found = info.backing_filename.map(|b| real(dir.join(b)));
    let planned = planned.map(|p| real(root.join(p)));
    if found != planned {
        return Err(CommitError::WrongParent {
            key,
            file: file.to_owned(),
            found,
            planned,
        });
    }
    Ok(())
}

/// SHA-256 of the whole disk as the restore point restores it.
pub(crate) async fn read_back(file: &Path, key: i32) -> Result<String, CommitError> {
    let server = ReadOnlyExport::start(file)
        .await
        .map_err(|source| CommitError::Export { key, source })?;
    let opts = ConnectOptions::with_request_timeout(READ_TIMEOUT);
    let read = async {
        let client = NbdClient::connect(&server.url(), &opts).await?;
        let sum = checksum::sha256(&client, checksum::REQUEST_SIZE, checksum::IN_FLIGHT).await;
        client.disconnect().await;
        sum
    };
    read.await
        .map_err(|source| CommitError::Read { key, source })
}

/// Writes `text` as `target`, which must not exist, durably: temporary file, fsync, hard link
/// (fails when `target` exists, unlike a rename), fsync of the directory.
fn write_new(dir: &Path, target: &Path, text: &str) -> Result<(), CommitError> {
    let tmp = dir.join(format!(".{MANIFEST_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.write_all(b"\n").map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, target);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(io(target))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}
