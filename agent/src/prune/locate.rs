//! Which point: a directory inside the root, with a manifest; or one already pruned.

use std::path::{Component, Path};

use sendense_contract::manifest::{MANIFEST_FILE, Manifest};
use sendense_contract::prune::PruneRefusal;

use super::chain::Volume;
use super::{PruneError, refused};

/// The volume (its root resolved) and the point's directory relative to it.
pub fn volume_and_point(root: &Path, point: &str) -> Result<(Volume, String), PruneError> {
    let root = root.canonicalize().map_err(|e| {
        refused(
            PruneRefusal::BadArguments,
            format!("--root {}: {e}", root.display()),
        )
    })?;
    let shown = root.display().to_string();
    let outside = || {
        refused(
            PruneRefusal::NotInsideRoot,
            format!(
                "--point {point:?} is not a restore point's directory inside the volume {shown}: give its path relative to --root, without `..`"
            ),
        )
    };
    let rel = Path::new(point.trim_end_matches('/'));
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let vol = Volume { root };
    // A symbolic link on the way may lead out of the volume.
    if let Ok(real) = vol.root.join(rel).canonicalize()
        && vol.rel(&real).as_deref() != Some(&*rel.to_string_lossy())
    {
        return Err(outside());
    }
    let point = rel.to_string_lossy().into_owned();
    Ok((vol, point))
}

/// The point's manifest; `None` when it has none and is not a directory of files either (an
/// earlier prune removed it, or is removing its directory).
pub fn manifest(vol: &Volume, point: &str) -> Result<Option<Manifest>, PruneError> {
    let dir = vol.abs(point);
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if holds_files(&dir)? {
                return Err(refused(
                    PruneRefusal::NotARestorePoint,
                    format!(
                        "{point} has no {MANIFEST_FILE}: it is an attempt that did not commit (or a backup still running), not a restore point; an attempt that failed is removed with `repo probe --remove-orphan {point}` once idle, not pruned"
                    ),
                ));
            }
            return Ok(None);
        }
        Err(source) => return Err(PruneError::Io { path, source }),
    };
    let m = Manifest::parse(&text).map_err(|e| {
        refused(
            PruneRefusal::NotARestorePoint,
            format!("{point}: {e}; a manifest that cannot be read is never pruned"),
        )
    })?;
    if m.directory != point {
        return Err(refused(
            PruneRefusal::ChainInconsistent,
            format!(
                "{point}: its manifest names the directory {}: the point was moved; give --point {} or move it back",
                m.directory, m.directory
            ),
        ));
    }
    Ok(Some(m))
}

/// True when `dir` holds anything but a manifest's temporary file.
fn holds_files(dir: &Path) -> Result<bool, PruneError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(PruneError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for e in entries {
        let e = e.map_err(|source| PruneError::Io {
            path: dir.to_owned(),
            source,
        })?;
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with(&format!(".{MANIFEST_FILE}."))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A point with no manifest and no files: pruned already, unless a manifest still names it as
/// a parent. A directory left empty by a prune stopped before removing it is removed.
pub fn already_gone(vol: &Volume, point: &str, written: &mut bool) -> Result<(), PruneError> {
    let walked = crate::repo::walk(&vol.root).map_err(PruneError::Scan)?;
    let inside = format!("{point}/");
    for path in walked.manifests {
        let Some(m) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| Manifest::parse(&t).ok())
        else {
            continue;
        };
        let names_it = m.parent.as_ref().is_some_and(|p| p.directory == point)
            || m.disks.iter().any(|d| {
                d.backing_file
                    .as_ref()
                    .is_some_and(|b| b.starts_with(&inside))
            });
        if names_it {
            return Err(refused(
                PruneRefusal::ChainInconsistent,
                format!(
                    "{point} has no manifest, but the restore point {} is layered on it: its chain is broken; restore from another point and take a full backup",
                    m.directory
                ),
            ));
        }
    }
    let dir = vol.abs(point);
    if dir.is_dir() {
        *written = true;
        for e in std::fs::read_dir(&dir).map_err(|source| PruneError::Io {
            path: dir.clone(),
            source,
        })? {
            let p = e
                .map_err(|source| PruneError::Io {
                    path: dir.clone(),
                    source,
                })?
                .path();
            std::fs::remove_file(&p).map_err(|source| PruneError::Io { path: p, source })?;
        }
        super::finish::remove_dir(&dir)?;
    }
    Ok(())
}
