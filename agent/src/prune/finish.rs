//! After the merges: the children read back, their manifests pointed past the point, and the
//! point removed. Each part is done again unharmed after a crash.

use std::io::Write;
use std::path::Path;

use sendense_contract::manifest::{DiskCopy, MANIFEST_FILE, Manifest, RetentionJournal};

use super::PruneError;
use super::chain::Volume;
use super::steps::sync;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PruneError + '_ {
    move |source| PruneError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_manifest(vol: &Volume, dir: &str) -> Result<Manifest, PruneError> {
    let path = vol.abs(dir).join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    Manifest::parse(&text).map_err(|source| PruneError::Manifest { path, source })
}

/// Every merged disk of every child, read through its chain as a restore reads it (the
/// commit's read-back), hashes as the child's manifest records.
pub async fn verify(vol: &Volume, journal: &RetentionJournal) -> Result<(), PruneError> {
    for step in &journal.steps {
        let child = read_manifest(vol, &step.child)?;
        let expected = child
            .disks
            .iter()
            .find(|d| d.device_key == step.device_key)
            .map(|d| d.sha256.clone())
            .unwrap_or_default();
        let found = crate::commit::read_back(&vol.abs(&step.child_file), step.device_key)
            .await
            .map_err(|source| PruneError::Read {
                child: step.child.clone(),
                key: step.device_key,
                source,
            })?;
        if found != expected {
            return Err(PruneError::Mismatch {
                child: step.child.clone(),
                key: step.device_key,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Each child's manifest names the point's parent as its parent, and its disks that were
/// layered on the point's files the point's parent's files (a disk left with no backing file
/// is a full copy now). The SHA-256s do not change: the disks read as before.
pub fn repoint_children(
    vol: &Volume,
    point: &Manifest,
    journal: &RetentionJournal,
) -> Result<(), PruneError> {
    for dir in &journal.children {
        let mut child = read_manifest(vol, dir)?;
        let before = child.clone();
        if child
            .parent
            .as_ref()
            .is_some_and(|p| p.directory == point.directory)
        {
            child.parent = point.parent.clone();
        }
        for d in child.disks.iter_mut() {
            let Some(pd) = point
                .disks
                .iter()
                .find(|pd| d.backing_file.as_deref() == Some(pd.file.as_str()))
            else {
                continue;
            };
            d.backing_file = pd.backing_file.clone();
            if d.backing_file.is_none() {
                d.copy = DiskCopy::Full;
            }
        }
        if child != before {
            write_replacing(&vol.abs(dir).join(MANIFEST_FILE), &child.to_json())?;
        }
    }
    Ok(())
}

/// Removes the point: its QCOW2 files, then its manifest (the journal: from here on a resumed
/// prune finds nothing to do), then its directory. A file prune does not know stops it first.
pub fn delete_point(vol: &Volume, point: &Manifest) -> Result<(), PruneError> {
    let dir = vol.abs(&point.directory);
    let temp = format!(".{MANIFEST_FILE}.");
    let mut temps = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let known = name == MANIFEST_FILE
            || point
                .disks
                .iter()
                .any(|d| vol.abs(&d.file) == dir.join(&name));
        if name.starts_with(&temp) {
            temps.push(e.path());
        } else if !known {
            return Err(PruneError::Inconsistent(format!(
                "{} holds {name}, which is none of the point's files: move it away, then run the prune again",
                point.directory
            )));
        }
    }
    for d in &point.disks {
        let f = vol.abs(&d.file);
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&f)(e)),
            _ => {}
        }
    }
    for t in temps {
        std::fs::remove_file(&t).map_err(io(&t))?;
    }
    sync(&dir)?;
    let manifest = dir.join(MANIFEST_FILE);
    std::fs::remove_file(&manifest).map_err(io(&manifest))?;
    remove_dir(&dir)
}

/// Removes an empty directory and makes that durable.
pub fn remove_dir(dir: &Path) -> Result<(), PruneError> {
    std::fs::remove_dir(dir).map_err(io(dir))?;
    match dir.parent() {
        Some(parent) => sync(parent),
        None => Ok(()),
    }
}

/// Replaces `target` with `text` atomically and durably: a temporary file beside it, fsync,
/// rename over it, fsync of the directory. A reader sees the old manifest or the new one.
pub fn write_replacing(target: &Path, text: &str) -> Result<(), PruneError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{MANIFEST_FILE}.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.write_all(b"\n").map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, target).map_err(io(target))?;
    sync(dir)
}
