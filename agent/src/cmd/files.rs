//! `files`: the guest file systems of a restore point, without Kubernetes and without a
//! kernel mount. `files volumes` lists each disk's volumes and what is on them; `files ls`
//! lists paths; `files get` extracts paths (globs) into a directory or a tar archive, with
//! modes, owners and times as the guest stored them.
//!
//! A volume is named `DISK:PARTITION` (`2000:1`; `2000:0` for a disk without a partition
//! table). Paths are absolute from the volume's root. `get` checks every pattern first: one
//! that matches nothing in the chosen volumes fails the command before anything is written.
//! When the matches come from more than one volume, each volume's files go under
//! `<to>/disk-<DISK>-vol-<PARTITION>/`; from one volume, straight under `<to>/`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sendense_guestfs::walk::{self, DEFAULT_MAX_DEPTH, Pattern};
use sendense_guestfs::{FileSystem, Node, NodeKind};

use sendense_contract::cli::FilesGetArgs;
use sendense_contract::restore::FilesResult;
use sendense_contract::result::TERMINATION_MESSAGE_LIMIT;

use super::{Outcome, refusal_of, refused, write_result_file};
use crate::guest::{self, GuestDisk, GuestVolume};
use crate::nbd::ConnectOptions;
use sendense_contract::restore::Refusal;

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// A committed restore point's directory (its manifest names the disks).
    #[arg(long, conflicts_with = "image")]
    pub restore_point: Option<PathBuf>,
    /// One QCOW2 file (the top of a chain), read as disk 0 (or the single --disk given).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Only these disks (device keys, repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<i32>,
    /// Only these volumes, DISK:PARTITION (repeatable); default every volume with a file
    /// system.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// Seconds allowed for each NBD request.
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum FilesCommand {
    /// The volumes of each disk: partition, size, file system, label.
    Volumes(VolumesArgs),
    /// Paths matching the patterns (default `/`); a matched directory's entries follow it.
    Ls(LsArgs),
    /// Extract paths matching the patterns (a directory brings everything in it).
    Get(FilesGetArgs),
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct VolumesArgs {
    #[command(flatten)]
    pub source: Source,
}

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct LsArgs {
    #[command(flatten)]
    pub source: Source,
    /// Glob patterns over absolute paths: `*`, `?`, `[...]`, `**` for any depth.
    pub patterns: Vec<String>,
    /// Levels listed below a matched directory.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(command: FilesCommand) -> Result<Outcome> {
    let source = match &command {
        FilesCommand::Volumes(a) => a.source.clone(),
        FilesCommand::Ls(a) => a.source.clone(),
        FilesCommand::Get(a) => Source {
            restore_point: a.restore_point.clone(),
            image: a.image.clone(),
            disks: a.disks.clone(),
            volumes: a.volumes.clone(),
            request_timeout: a.request_timeout,
        },
    };
    let FilesCommand::Get(args) = command else {
        let vols = open(source).await?;
        return tokio::task::spawn_blocking(move || {
            let (vols, _disks) = &vols;
            match command {
                FilesCommand::Volumes(_) => volumes(vols),
                FilesCommand::Ls(a) => ls(vols, &a),
                FilesCommand::Get(_) => unreachable!("handled below"),
            }
        })
        .await?;
    };
    // `get` answers with a result, on stdout and in --result-file, whatever happens.
    let result = match open(source).await {
        Err(e) => FilesResult {
            refused: refusal_of(&e),
            error: Some(format!("{e:#}")),
            nothing_written: true,
            ..Default::default()
        },
        Ok(vols) => {
            let a = args.clone();
            tokio::task::spawn_blocking(move || get(&vols.0, &a))
                .await
                .unwrap_or_else(|e| FilesResult {
                    error: Some(format!("extraction stopped: {e}")),
                    ..Default::default()
                })
        }
    };
    println!("{}", serde_json::to_string(&result)?);
    if let Some(path) = &args.result_file {
        write_result_file(path, &result.compact_json(TERMINATION_MESSAGE_LIMIT))?;
    }
    Ok(Outcome::of(result.ok))
}

/// The chosen volumes of the chosen disks, each with its file system opened (and the disks,
/// which must outlive them).
async fn open(source: Source) -> Result<(Vec<GuestVolume>, Vec<GuestDisk>)> {
    let opts = ConnectOptions::with_request_timeout(Duration::from_secs(source.request_timeout));
    let files = guest::disk_files(
        source.restore_point.as_deref(),
        source.image.as_deref(),
        &source.disks,
    )?;
    let mut disks = Vec::new();
    for (key, file) in files {
        disks.push(GuestDisk::open(key, &file, &opts).await?);
    }
    let wanted = source.volumes;
    tokio::task::spawn_blocking(move || {
        let mut vols = guest::volumes(&disks)?;
        if !wanted.is_empty() {
            for w in &wanted {
                if !vols.iter().any(|v| &v.name() == w) {
                    let have: Vec<String> = vols.iter().map(GuestVolume::name).collect();
                    return Err(refused(
                        Refusal::DiskNotFound,
                        format!("volume {w}: no such volume (volumes: {have:?})"),
                    ));
                }
            }
            vols.retain(|v| wanted.contains(&v.name()));
        }
        Ok((vols, disks))
    })
    .await?
}

fn volumes(vols: &[GuestVolume]) -> Result<Outcome> {
    for v in vols {
        let (fs, label, error) = match &v.fs {
            Ok(fs) => (Some(fs.kind().to_string()), fs.label(), None),
            Err(e) => (None, None, Some(e.clone())),
        };
        println!(
            "{}",
            serde_json::json!({
                "volume": v.name(), "disk": v.disk, "partition": v.volume.number,
                "table": v.volume.table, "type": v.volume.type_id, "name": v.volume.name,
                "start": v.volume.start, "size": v.volume.size,
                "filesystem": fs, "label": label, "error": error,
            })
        );
    }
    Ok(Outcome::Succeeded)
}

fn patterns(texts: &[String]) -> Result<Vec<Pattern>> {
    texts
        .iter()
        .map(|t| {
            Pattern::new(t)
                .map_err(|e| refused(Refusal::BadArguments, format!("pattern {t:?}: {}", e.why)))
        })
        .collect()
}

/// The volumes with a file system, or an error when there is none.
fn readable(vols: &[GuestVolume]) -> Result<Vec<(&GuestVolume, &dyn FileSystem)>> {
    let r: Vec<_> = vols
        .iter()
        .filter_map(|v| v.fs.as_ref().ok().map(|fs| (v, fs.as_ref())))
        .collect();
    if r.is_empty() {
        let why: Vec<String> = vols
            .iter()
            .map(|v| format!("{}: {}", v.name(), v.fs.as_ref().err().map_or("", |e| e)))
            .collect();
        return Err(refused(
            Refusal::NoFileSystem,
            format!(
                "no readable file system on the chosen volumes ({})",
                why.join("; ")
            ),
        ));
    }
    Ok(r)
}

fn ls(vols: &[GuestVolume], args: &LsArgs) -> Result<Outcome> {
    let texts = if args.patterns.is_empty() {
        vec!["/".to_owned()]
    } else {
        args.patterns.clone()
    };
    let pats = patterns(&texts)?;
    let mut matched = vec![false; pats.len()];
    for (v, fs) in readable(vols)? {
        let sel = walk::select(fs, &pats, DEFAULT_MAX_DEPTH)
            .with_context(|| format!("volume {}", v.name()))?;
        for (i, t) in texts.iter().enumerate() {
            if !sel.unmatched.contains(t) {
                matched[i] = true;
            }
        }
        for (path, node) in &sel.matches {
            print_node(v, fs, path, node, args.json);
            if node.kind == NodeKind::Directory && args.depth > 0 {
                for (p, n) in walk::list(fs, path, args.depth)
                    .with_context(|| format!("volume {}: listing {path}", v.name()))?
                {
                    print_node(v, fs, &p, &n, args.json);
                }
            }
        }
    }
    let unmatched: Vec<&String> = texts
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(t, _)| t)
        .collect();
    if !unmatched.is_empty() {
        eprintln!("sendense-agent: no path matches {unmatched:?}");
        return Ok(Outcome::Failed);
    }
    Ok(Outcome::Succeeded)
}

fn print_node(v: &GuestVolume, fs: &dyn FileSystem, path: &str, n: &Node, json: bool) {
    let target = (n.kind == NodeKind::Symlink)
        .then(|| fs.read_link(n).ok())
        .flatten()
        .map(|t| String::from_utf8_lossy(&t).into_owned());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "volume": v.name(), "path": path, "kind": format!("{:?}", n.kind).to_lowercase(),
                "size": n.size, "mode": format!("{:04o}", n.mode), "uid": n.uid, "gid": n.gid,
                "mtime": n.mtime.secs, "mtimeNanos": n.mtime.nanos, "links": n.links,
                "target": target,
            })
        );
    } else {
        let kind = match n.kind {
            NodeKind::Directory => 'd',
            NodeKind::Symlink => 'l',
            NodeKind::File => '-',
            NodeKind::Other => '?',
        };
        let link = target.map(|t| format!(" -> {t}")).unwrap_or_default();
        println!(
            "{} {kind}{:04o} {:>6} {:>6} {:>12} {} {path}{link}",
            v.name(),
            n.mode,
            n.uid,
            n.gid,
            n.size,
            n.mtime.secs
        );
    }
}

fn get(vols: &[GuestVolume], args: &FilesGetArgs) -> FilesResult {
    match extract(vols, args) {
        Ok(r) => r,
        Err(e) => FilesResult {
            refused: refusal_of(&e),
            error: Some(format!("{e:#}")),
            nothing_written: true,
            ..Default::default()
        },
    }
}

/// Selects on every volume, checks every pattern matched, then writes.
fn extract(vols: &[GuestVolume], args: &FilesGetArgs) -> Result<FilesResult> {
    let pats = patterns(&args.patterns)?;
    let mut found = Vec::new();
    let mut matched = vec![false; pats.len()];
    for (v, fs) in readable(vols)? {
        let sel = walk::select(fs, &pats, DEFAULT_MAX_DEPTH)
            .with_context(|| format!("volume {}", v.name()))?;
        for (i, t) in args.patterns.iter().enumerate() {
            if !sel.unmatched.contains(t) {
                matched[i] = true;
            }
        }
        if !sel.matches.is_empty() {
            found.push((v, fs, sel.matches));
        }
    }
    let unmatched: Vec<&String> = args
        .patterns
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(t, _)| t)
        .collect();
    if !unmatched.is_empty() {
        let names: Vec<String> = vols.iter().map(GuestVolume::name).collect();
        return Err(refused(
            Refusal::NothingMatched,
            format!("no path matches {unmatched:?} on volumes {names:?}: nothing was written"),
        ));
    }
    let several = found.len() > 1;
    if several && args.tar.is_some() {
        return Err(refused(
            Refusal::BadArguments,
            "the patterns match on several volumes and a tar holds one: choose it with --volume; nothing was written",
        ));
    }
    let mut result = FilesResult::default();
    for (v, fs, matches) in found {
        let report = if let Some(dir) = &args.to {
            let dir = if several {
                dir.join(format!("disk-{}-vol-{}", v.disk, v.volume.number))
            } else {
                dir.clone()
            };
            walk::extract::to_dir(fs, &matches, &dir, DEFAULT_MAX_DEPTH)
        } else if let Some(tar) = &args.tar {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(tar).with_context(|| tar.display().to_string())?,
            );
            let r = walk::archive::to_tar(fs, &matches, &mut out, DEFAULT_MAX_DEPTH)
                .with_context(|| format!("writing {}", tar.display()))?;
            out.flush()?;
            out.get_ref().sync_all()?;
            r
        } else {
            bail!("give --to DIR or --tar FILE");
        };
        result.files += report.files;
        result.directories += report.directories;
        result.symlinks += report.symlinks;
        result.bytes += report.bytes;
        result.ownership_not_set += report.ownership_not_set.len() as u64;
        result.failed += report.failures.len() as u64;
        for f in report.failures {
            if result.failures.len() < 20 {
                result
                    .failures
                    .push(format!("{} {}: {}", v.name(), f.path, f.reason));
            }
        }
    }
    result.ok = result.failed == 0;
    if !result.ok {
        result.error = Some(format!("{} paths could not be restored", result.failed));
    }
    Ok(result)
}
