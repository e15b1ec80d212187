//! Layers: a directory tree or an existing tar archive, rewritten as a normalised tar and
//! gzip-compressed into a blob. Normalised means: entries sorted by path (bytes), every mtime
//! the build's epoch, owners numeric (names dropped), modes kept (setuid/setgid/sticky too),
//! symlinks kept verbatim, hard links kept as links (the first path of a group in sorted order
//! holds the data), devices, FIFOs and sockets skipped (the runtime provides /dev), xattrs and
//! ACLs dropped, gzip without a name or timestamp. Same inputs, same bytes, same digests.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use tar::{EntryType, Header};

use super::digest::{Digest, DigestWriter};

mod read;
use read::{read_dir_tree, read_tar, resolve_tar_hard_links};

/// Owners of the entries of a directory layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// uid 0, gid 0 (the default: the build user's ids never leak into an image).
    Root,
    /// These ids for every entry.
    Id { uid: u32, gid: u32 },
    /// The ids the files have on disk.
    Keep,
}

/// Where a layer's content comes from.
#[derive(Clone, Debug)]
pub enum LayerSource {
    /// A directory; its content becomes the image root (the directory itself is not an entry).
    Dir { path: PathBuf, owner: Owner },
    /// A tar archive (e.g. mmdebstrap's); owners are kept as the archive records them.
    Tar { path: PathBuf },
    /// A blob built earlier (cached), used as it is.
    Built(BuiltLayer),
}

/// A layer blob on disk and what its descriptor and the image config say about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltLayer {
    /// The gzip-compressed tar.
    pub blob: PathBuf,
    /// Digest of the blob (the manifest's layer descriptor).
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
    /// The config's history entry for this layer.
    pub created_by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{archive}: entry {entry:?}: {reason}")]
    Unsupported {
        archive: PathBuf,
        entry: String,
        reason: &'static str,
    },
    #[error(
        "{source_path}: hard link {entry:?} points to {target:?}, which is not a file of the archive"
    )]
    BrokenHardLink {
        source_path: PathBuf,
        entry: String,
        target: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where an entry's bytes are.
#[derive(Clone, Debug)]
enum Data {
    File(PathBuf),
    /// A range of the source tar archive.
    TarRange {
        offset: u64,
    },
}

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    /// A regular file; entries with the same `link_group` are hard links of one another.
    File {
        data: Data,
        size: u64,
        link_group: Option<String>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link in a source tar, resolved into a `File` before writing.
    TarHardLink {
        target: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    /// Relative, normalised, no `./`, no trailing slash.
    path: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
}

/// What was left out, for the build log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub special_files: u64,
}

/// Builds the layer blob of `source` into `dir` (named after its digest) and returns it.
/// A `Built` source is returned as it is.
pub fn build_layer(
    source: &LayerSource,
    epoch: u64,
    created_by: &str,
    dir: &Path,
) -> Result<(BuiltLayer, Skipped), LayerError> {
    let (mut entries, skipped, tar_source) = match source {
        LayerSource::Built(built) => return Ok((built.clone(), Skipped::default())),
        LayerSource::Dir { path, owner } => {
            let (entries, skipped) = read_dir_tree(path, *owner)?;
            (entries, skipped, None)
        }
        LayerSource::Tar { path } => {
            let (entries, skipped) = read_tar(path)?;
            (entries, skipped, Some(path.as_path()))
        }
    };
    // Stable sort, then the last entry of a path wins, as when a tar is extracted.
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.reverse();
    entries.dedup_by(|later, earlier| later.path == earlier.path);
    entries.reverse();
    if let Some(archive) = tar_source {
        resolve_tar_hard_links(&mut entries, archive)?;
    }

    let tmp = dir.join(format!(".layer-{}.tmp", std::process::id()));
    let result = write_layer(&entries, tar_source, epoch, &tmp).and_then(
        |(digest, size, diff_id, tar_size)| {
            let blob = dir.join(format!("{}.tar.gz", digest.hex()));
            std::fs::rename(&tmp, &blob).map_err(io_err("moving the layer to", &blob))?;
            Ok(BuiltLayer {
                blob,
                digest,
                size,
                diff_id,
                tar_size,
                created_by: created_by.to_owned(),
            })
        },
    );
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok((result?, skipped))
}

fn write_layer(
    entries: &[Entry],
    tar_source: Option<&Path>,
    epoch: u64,
    tmp: &Path,
) -> Result<(Digest, u64, Digest, u64), LayerError> {
    let file = File::create(tmp).map_err(io_err("creating", tmp))?;
    let compressed = DigestWriter::new(BufWriter::with_capacity(1 << 20, file));
    // No file name and mtime 0 in the gzip header: nothing of the build machine gets in.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(compressed, Compression::default());
    let mut tar = tar::Builder::new(DigestWriter::new(gz));
    let mut source = match tar_source {
        Some(p) => Some(File::open(p).map_err(io_err("opening", p))?),
        None => None,
    };
    let mut link_leaders: HashMap<&str, &[u8]> = HashMap::new();
    for entry in entries {
        append_entry(&mut tar, entry, epoch, source.as_mut(), &mut link_leaders).map_err(
            io_err(
                "writing the layer entry for",
                Path::new(OsStr::from_bytes(&entry.path)),
            ),
        )?;
    }
    let write_err = io_err("writing", tmp);
    let (gz, diff_id, tar_size) = tar.into_inner().map_err(write_err)?.finish();
    let compressed = gz.finish().map_err(io_err("compressing", tmp))?;
    let (mut out, digest, size) = compressed.finish();
    out.flush().map_err(io_err("writing", tmp))?;
    Ok((digest, size, diff_id, tar_size))
}

fn append_entry<'e, W: Write>(
    tar: &mut tar::Builder<W>,
    entry: &'e Entry,
    epoch: u64,
    source: Option<&mut File>,
    link_leaders: &mut HashMap<&'e str, &'e [u8]>,
) -> io::Result<()> {
    let path = Path::new(OsStr::from_bytes(&entry.path));
    let mut header = Header::new_gnu();
    header.set_mode(entry.mode & 0o7777);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(epoch);
    header.set_size(0);
    match &entry.kind {
        Kind::Dir => {
            header.set_entry_type(EntryType::Directory);
            tar.append_data(&mut header, path, io::empty())
        }
        Kind::Symlink { target } => {
            header.set_entry_type(EntryType::Symlink);
            if target.len() > 100 {
                // GNU long link name: a 'K' entry with the target, as GNU tar writes it.
                let mut long = Header::new_gnu();
                long.set_path("././@LongLink")?;
                long.set_mode(0o644);
                long.set_mtime(0);
                long.set_entry_type(EntryType::GNULongLink);
                long.set_size(target.len() as u64 + 1);
                long.set_cksum();
                tar.append(&long, target.as_slice().chain(&[0u8][..]))?;
                header.set_link_name_literal(&target[..100])?;
            } else {
                header.set_link_name_literal(target)?;
            }
            tar.append_data(&mut header, path, io::empty())
        }
        Kind::File {
            data,
            size,
            link_group,
        } => {
            if let Some(group) = link_group {
                if let Some(leader) = link_leaders.get(group.as_str()) {
                    header.set_entry_type(EntryType::Link);
                    return tar.append_link(
                        &mut header,
                        path,
                        Path::new(OsStr::from_bytes(leader)),
                    );
                }
                link_leaders.insert(group.as_str(), &entry.path);
            }
            header.set_entry_type(EntryType::Regular);
            header.set_size(*size);
            match data {
                Data::File(file) => {
                    let f = File::open(file)?;
                    tar.append_data(&mut header, path, Exact::new(f, *size))
                }
                Data::TarRange { offset } => {
                    let src = source.ok_or_else(|| io::Error::other("no source archive"))?;
                    src.seek(SeekFrom::Start(*offset))?;
                    tar.append_data(&mut header, path, Exact::new(src, *size))
                }
            }
        }
        Kind::TarHardLink { .. } => Err(io::Error::other("unresolved hard link")),
    }
}

/// Reads exactly `size` bytes: a file that shrank since it was measured is an error, not a
/// corrupt archive (the tar header already holds the size).
pub(super) struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Exact<R> {
    pub(super) fn new(inner: R, size: u64) -> Self {
        Self {
            inner: inner.take(size),
            left: size,
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} bytes fewer than its recorded size", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
