//! The chain as it is on the volume: paths relative to the root, what a QCOW2 file is layered
//! on, what a layer holds itself, and a bounded qemu-img.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::PruneError;
use crate::copy::ChangedArea;

/// The repository volume, its root resolved once.
#[derive(Debug, Clone)]
pub struct Volume {
    pub root: PathBuf,
}

impl Volume {
    /// A path relative to the root, as manifests record them.
    pub fn abs(&self, rel: &str) -> PathBuf {
        lexical(&self.root.join(rel))
    }

    /// A path below the root as manifests record it; `None` outside the root.
    pub fn rel(&self, abs: &Path) -> Option<String> {
        lexical(abs)
            .strip_prefix(&self.root)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
            .map(|r| r.to_string_lossy().into_owned())
    }

    /// The backing file to write into the header of `file` (relative to `file`'s directory, as
    /// `hub prepare` writes them) for the volume path `target`.
    pub fn backing_string(&self, file: &str, target: &str) -> String {
        let dir = self.abs(file);
        let dir = dir.parent().unwrap_or(&self.root);
        crate::hub::relative_to(&self.abs(target), dir)
            .to_string_lossy()
            .into_owned()
    }
}

/// `p` with `.` and `..` components resolved without touching the file system (a backing
/// file that is gone still has a path to compare).
pub fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// What a QCOW2 file's header says it is layered on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// As written in the header.
    pub written: Option<String>,
    /// Resolved from the file's directory, relative to the volume root (`None` also when it
    /// leaves the volume: then `written` is set and this is not).
    pub resolved: Option<String>,
}

/// The backing file of `file` (a volume path).
pub async fn backing(vol: &Volume, file: &str, deadline: Duration) -> Result<Backing, PruneError> {
    let abs = vol.abs(file);
    let out = qemu_img(
        &["info", "--output=json", "-U"],
        &abs,
        None,
        deadline,
        format!("qemu-img info {file}"),
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| PruneError::Qemu {
        what: format!("qemu-img info {file}"),
        message: e.to_string(),
    })?;
    if v["format"].as_str() != Some("qcow2") {
        return Err(PruneError::NotQcow2(file.to_owned()));
    }
    let written = v["backing-filename"].as_str().map(str::to_owned);
    let resolved = written.as_ref().and_then(|w| {
        let dir = abs.parent().unwrap_or(&vol.root);
        vol.rel(&dir.join(w))
    });
    Ok(Backing { written, resolved })
}

/// The ranges a QCOW2 file holds itself, its backing file not followed (`qemu-img map` of
/// the layer alone): (ranges present, of which data). Zero clusters are present, not data.
pub async fn layer(
    vol: &Volume,
    file: &str,
    deadline: Duration,
) -> Result<(Vec<ChangedArea>, Vec<ChangedArea>), PruneError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        start: u64,
        length: u64,
        #[serde(default)]
        present: bool,
        #[serde(default)]
        data: bool,
    }
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": vol.abs(file)},
    });
    let what = format!("qemu-img map {file}");
    let out = qemu_img(
        &["map", "--output=json", "-U"],
        Path::new(&format!("json:{spec}")),
        None,
        deadline,
        what.clone(),
    )
    .await?;
    let entries: Vec<Entry> = serde_json::from_str(&out).map_err(|e| PruneError::Qemu {
        what,
        message: e.to_string(),
    })?;
    let area = |e: &Entry| ChangedArea {
        start: e.start,
        length: e.length,
    };
    let present = entries.iter().filter(|e| e.present && e.length > 0);
    Ok((
        present.clone().map(area).collect(),
        present.filter(|e| e.data).map(area).collect(),
    ))
}

/// Space a file takes on the volume (allocated blocks, not its apparent size); 0 when gone.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Runs `qemu-img <args> <file>` (in `dir`, when given: relative backing files given on its
/// command line resolve from there) and returns its stdout. Nothing waits forever: past
/// `deadline` qemu-img is killed (as a crash would: every step is safe to stop anywhere) and
/// the run fails. qemu-img dies with the agent (a killed prune leaves no writer behind to race
/// the prune that resumes it).
pub async fn qemu_img(
    args: &[&str],
    file: &Path,
    dir: Option<&Path>,
    deadline: Duration,
    what: String,
) -> Result<String, PruneError> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(args).arg(file).kill_on_drop(true);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    crate::qemu_nbd::die_with_agent(&mut cmd);
    let out = tokio::time::timeout(deadline, cmd.output())
        .await
        .map_err(|_| PruneError::Timeout {
            what: what.clone(),
            seconds: deadline.as_secs(),
        })?
        .map_err(|e| PruneError::Qemu {
            what: what.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PruneError::Qemu {
            what,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deadlines of the qemu-img runs on a disk of `capacity` bytes. Generous on purpose: they
/// are there so that a hung qemu-img cannot hold a prune (and its point) forever, not to
/// judge speed.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// `--timeout-seconds`, when given: every merge of every disk.
    pub merge_override: Option<Duration>,
}

impl Deadlines {
    /// `qemu-img commit` or `rebase`: 10 minutes, plus one second per 8 MiB of the disk.
    pub fn merge(&self, capacity: u64) -> Duration {
        self.merge_override
            .unwrap_or(Duration::from_secs(600 + capacity / (8 << 20)))
    }

    /// `qemu-img info` or `map` (metadata only): 2 minutes, plus one second per GiB.
    pub fn inspect(&self, capacity: u64) -> Duration {
        Duration::from_secs(120 + (capacity >> 30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_resolve_lexically_and_backings_are_written_relative() {
        let vol = Volume {
            root: PathBuf::from("/repo"),
        };
        assert_eq!(
            vol.rel(Path::new("/repo/ns/vm/b/../a/2000.qcow2")),
            Some("ns/vm/a/2000.qcow2".into())
        );
        assert_eq!(vol.rel(Path::new("/repo/ns/../../etc/passwd")), None);
        assert_eq!(vol.rel(Path::new("/repo")), None);
        assert_eq!(
            vol.backing_string("ns/vm/c/2000.qcow2", "ns/vm/a/2000.qcow2"),
            "../a/2000.qcow2"
        );
        assert_eq!(
            vol.backing_string("ns/new/c/2000.qcow2", "ns/vm/a/2000.qcow2"),
            "../../vm/a/2000.qcow2"
        );
    }
}
