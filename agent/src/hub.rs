//! Hub-side preparation of one disk's QCOW2 file: a fresh image for a full backup, or an
//! overlay whose backing file is the previous backup of the same disk; and removal of the files
//! a failed backup left.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("backing file {0} does not exist: the chain parent is missing, take a full backup")]
    MissingParent(PathBuf),
    #[error(
        "backing file {path} holds a {parent} byte disk but this backup is {size} bytes: the disk was resized, take a full backup"
    )]
    SizeMismatch {
        path: PathBuf,
        parent: u64,
        size: u64,
    },
    #[error("{0} is not a QCOW2 image")]
    NotQcow2(PathBuf),
    #[error("refusing {0}: the path has a `..` component")]
    ParentComponent(PathBuf),
    #[error("{0} is a directory, not a backup file")]
    IsADirectory(PathBuf),
    #[error("running qemu-img {args}: {message}")]
    QemuImg { args: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Facts about an image, from `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub backing_filename: Option<String>,
}

pub fn info(path: &Path) -> Result<ImageInfo, HubError> {
    let out = qemu_img_in(
        Path::new("."),
        &["info", "--output=json", "-U", &path.to_string_lossy()],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| HubError::QemuImg {
        args: format!("info {}", path.display()),
        message: e.to_string(),
    })?;
    Ok(ImageInfo {
        format: v["format"].as_str().unwrap_or_default().to_owned(),
        virtual_size: v["virtual-size"].as_u64().unwrap_or_default(),
        backing_filename: v["backing-filename"].as_str().map(str::to_owned),
    })
}

/// Runs qemu-img in `dir` (relative backing files resolve from the new image's directory).
fn qemu_img_in(dir: &Path, args: &[&str]) -> Result<String, HubError> {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| HubError::QemuImg {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HubError::QemuImg {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The path of `target` relative to directory `from`. Backing files are recorded relative to
/// the overlay, because the repository volume is mounted at different paths in different pods.
pub fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    rel
}

/// What `prepare` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Prepared {
    pub file: PathBuf,
    pub size: u64,
    /// Backing file as recorded in the image (relative to it).
    pub backing_file: Option<String>,
    /// True when an earlier attempt's file was replaced.
    pub replaced: bool,
}

/// Creates `file` (a `size`-byte QCOW2), layered on `backing` when given. A file left by an
/// earlier attempt of the same job is replaced: a retry reads a new snapshot, so nothing the
/// old attempt wrote may be trusted.
pub fn prepare(file: &Path, size: u64, backing: Option<&Path>) -> Result<Prepared, HubError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HubError::Io { path, source }
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let file = dir.join(
        file.file_name()
            .ok_or_else(|| HubError::NotQcow2(file.to_owned()))?,
    );

    let backing_rel = match backing {
        None => None,
        Some(b) => {
            let b = if b.is_absolute() {
                b.to_owned()
            } else {
                dir.join(b)
            };
            let b = b
                .canonicalize()
                .map_err(|_| HubError::MissingParent(b.clone()))?;
            let parent = info(&b)?;
            if parent.format != "qcow2" {
                return Err(HubError::NotQcow2(b));
            }
            if parent.virtual_size != size {
                return Err(HubError::SizeMismatch {
                    path: b,
                    parent: parent.virtual_size,
                    size,
                });
            }
            Some(relative_to(&b, &dir).to_string_lossy().into_owned())
        }
    };
    let replaced = file.exists();
    if replaced {
        std::fs::remove_file(&file).map_err(io(&file))?;
    }
    let file_s = file.to_string_lossy().into_owned();
    let size_s = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"];
    if let Some(b) = &backing_rel {
        args.extend(["-b", b.as_str(), "-F", "qcow2"]);
    }
    args.extend([file_s.as_str(), size_s.as_str()]);
    qemu_img_in(&dir, &args)?;
    Ok(Prepared {
        file,
        size,
        backing_file: backing_rel,
        replaced,
    })
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// Files removed.
    pub removed: Vec<PathBuf>,
    /// Files that did not exist (already removed: nothing to do).
    pub missing: Vec<PathBuf>,
    /// Parent directories removed because they became empty.
    pub removed_dirs: Vec<PathBuf>,
}

/// Removes the files a failed backup left (idempotent: a missing file is fine), then each
/// removed file's directory if that left it empty. Paths with a `..` component are refused,
/// before anything is removed.
pub fn remove(files: &[PathBuf]) -> Result<Removed, HubError> {
    for f in files {
        if f.components().any(|c| c == Component::ParentDir) {
            return Err(HubError::ParentComponent(f.clone()));
        }
    }
    let mut done = Removed::default();
    for f in files {
        match std::fs::symlink_metadata(f) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                done.missing.push(f.clone());
                continue;
            }
            Ok(m) if m.is_dir() => return Err(HubError::IsADirectory(f.clone())),
            _ => {}
        }
        match std::fs::remove_file(f) {
            Ok(()) => done.removed.push(f.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => done.missing.push(f.clone()),
            Err(source) => {
                return Err(HubError::Io {
                    path: f.clone(),
                    source,
                });
            }
        }
        // Fails unless the directory is empty, which is the point; errors are ignored.
        if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty())
            && !done.removed_dirs.iter().any(|d| d == dir)
            && std::fs::remove_dir(dir).is_ok()
        {
            done.removed_dirs.push(dir.to_owned());
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_between_chain_files() {
        assert_eq!(
            relative_to(
                Path::new("/repo/ns/vm/2000/a.qcow2"),
                Path::new("/repo/ns/vm/2000")
            ),
            PathBuf::from("a.qcow2")
        );
        assert_eq!(
            relative_to(
                Path::new("/repo/ns/old/2000/a.qcow2"),
                Path::new("/repo/ns/vm/2000")
            ),
            PathBuf::from("../../old/2000/a.qcow2")
        );
    }
}
