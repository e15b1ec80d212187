//! Reading a layer's input: a directory tree or a tar archive, as the sorted, normalised
//! entries `write_layer` writes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use tar::EntryType;

use super::{Data, Entry, Kind, LayerError, Owner, Skipped, io_err};

/// Every entry below `root`, its owners per `owner`.
pub(super) fn read_dir_tree(
    root: &Path,
    owner: Owner,
) -> Result<(Vec<Entry>, Skipped), LayerError> {
    let mut entries = Vec::new();
    let mut skipped = Skipped::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let listing = std::fs::read_dir(&dir).map_err(io_err("reading the directory", &dir))?;
        for item in listing {
            let item = item.map_err(io_err("reading the directory", &dir))?;
            let full = item.path();
            let meta = std::fs::symlink_metadata(&full).map_err(io_err("reading", &full))?;
            let rel = full
                .strip_prefix(root)
                .map_err(|_| LayerError::Io {
                    what: "walking",
                    path: full.clone(),
                    source: io::Error::other("outside the layer directory"),
                })?
                .as_os_str()
                .as_bytes()
                .to_vec();
            let (uid, gid) = match owner {
                Owner::Root => (0, 0),
                Owner::Id { uid, gid } => (u64::from(uid), u64::from(gid)),
                Owner::Keep => (u64::from(meta.uid()), u64::from(meta.gid())),
            };
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push(full.clone());
                Kind::Dir
            } else if ft.is_symlink() {
                let target =
                    std::fs::read_link(&full).map_err(io_err("reading the link", &full))?;
                Kind::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                }
            } else if ft.is_file() {
                Kind::File {
                    data: Data::File(full.clone()),
                    size: meta.len(),
                    link_group: (meta.nlink() > 1)
                        .then(|| format!("{}:{}", meta.dev(), meta.ino())),
                }
            } else {
                skipped.special_files += 1;
                continue;
            };
            entries.push(Entry {
                path: rel,
                kind,
                mode: if ft.is_symlink() { 0o777 } else { meta.mode() },
                uid,
                gid,
            });
        }
    }
    Ok((entries, skipped))
}

/// `./usr/bin/` -> `usr/bin`; `None` for the root itself; an error for `..`.
fn normalise(raw: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err("a path with `..`"),
            Component::Normal(part) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part.as_bytes());
            }
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Indexes a tar archive: each entry's header and where its bytes are, without reading them.
pub(super) fn read_tar(archive: &Path) -> Result<(Vec<Entry>, Skipped), LayerError> {
    let file = File::open(archive).map_err(io_err("opening", archive))?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let mut entries = Vec::new();
    let mut skipped = Skipped::default();
    let read_err = io_err("reading the archive", archive);
    let iter = tar.entries_with_seek().map_err(read_err)?;
    for item in iter {
        let item = item.map_err(io_err("reading the archive", archive))?;
        let raw = item.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let unsupported = |reason| LayerError::Unsupported {
            archive: archive.to_owned(),
            entry: name.clone(),
            reason,
        };
        let header = item.header();
        let entry_type = header.entry_type();
        let kind = match entry_type {
            EntryType::Directory => Kind::Dir,
            EntryType::Regular | EntryType::Continuous => Kind::File {
                data: Data::TarRange {
                    offset: item.raw_file_position(),
                },
                size: item.size(),
                link_group: None,
            },
            EntryType::Symlink => Kind::Symlink {
                target: item
                    .link_name_bytes()
                    .ok_or_else(|| unsupported("a symlink without a target"))?
                    .into_owned(),
            },
            EntryType::Link => Kind::TarHardLink {
                target: item
                    .link_name_bytes()
                    .ok_or_else(|| unsupported("a hard link without a target"))?
                    .into_owned(),
            },
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                skipped.special_files += 1;
                continue;
            }
            EntryType::GNUSparse => return Err(unsupported("a GNU sparse file")),
            // PAX global headers and other metadata-only entries.
            _ => continue,
        };
        let Some(path) = normalise(&raw).map_err(unsupported)? else {
            continue;
        };
        let field = |r: io::Result<u64>| r.map_err(io_err("reading the archive", archive));
        entries.push(Entry {
            path,
            kind,
            mode: header
                .mode()
                .map_err(io_err("reading the archive", archive))?,
            uid: field(header.uid())?,
            gid: field(header.gid())?,
        });
    }
    Ok((entries, skipped))
}

/// A hard link of a source tar becomes a `File` entry sharing its target's bytes and link
/// group, so the writer can keep the group as links whatever their sorted order.
pub(super) fn resolve_tar_hard_links(
    entries: &mut [Entry],
    archive: &Path,
) -> Result<(), LayerError> {
    let index: HashMap<Vec<u8>, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    for i in 0..entries.len() {
        let Kind::TarHardLink { target } = &entries[i].kind else {
            continue;
        };
        let broken = || LayerError::BrokenHardLink {
            source_path: archive.to_owned(),
            entry: String::from_utf8_lossy(&entries[i].path).into_owned(),
            target: String::from_utf8_lossy(target).into_owned(),
        };
        // Follow links of links (bounded) to the file that holds the bytes.
        let mut at = normalise(target).ok().flatten().ok_or_else(broken)?;
        let mut hops = 0;
        let (file, data, size) = loop {
            let j = *index.get(&at).ok_or_else(broken)?;
            match &entries[j].kind {
                Kind::File { data, size, .. } => break (j, data.clone(), *size),
                Kind::TarHardLink { target } if hops < 16 => {
                    at = normalise(target).ok().flatten().ok_or_else(broken)?;
                    hops += 1;
                }
                _ => return Err(broken()),
            }
        };
        let group = String::from_utf8_lossy(&entries[file].path).into_owned();
        entries[file].kind = Kind::File {
            data: data.clone(),
            size,
            link_group: Some(group.clone()),
        };
        let (mode, uid, gid) = (entries[file].mode, entries[file].uid, entries[file].gid);
        let e = &mut entries[i];
        e.kind = Kind::File {
            data,
            size,
            link_group: Some(group),
        };
        (e.mode, e.uid, e.gid) = (mode, uid, gid);
    }
    Ok(())
}
