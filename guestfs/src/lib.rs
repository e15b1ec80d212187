//! Guest file systems read in user space, for file-level restore: a disk image (any [`ReadAt`],
//! in the agent a QCOW2 chain served read-only over NBD) is split into volumes by its
//! partition table (MBR or GPT; a disk without one is one volume), and each volume's file system
//! (ext4, XFS, NTFS) is read through one small interface, [`FileSystem`]: nodes, directories,
//! file contents, symbolic links. No kernel mount, no loop or NBD device, no privilege.
//!
//! Everything here reads; nothing writes to the image. A damaged or hostile image gives an
//! error (`Error::Corrupt`) naming what was wrong, never a panic or an unbounded allocation.

pub mod ext4;
pub mod ntfs;
pub mod partition;
pub mod walk;
pub mod xfs;

use std::sync::Arc;

/// What went wrong reading a guest file system.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the disk image at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The structures on disk are inconsistent: what was being read and why it is wrong.
    #[error("{fs}: {what}")]
    Corrupt { fs: &'static str, what: String },
    /// A feature of the file system this reader does not implement (named).
    #[error("{fs}: not supported: {what}")]
    Unsupported { fs: &'static str, what: String },
    /// No known file system (or partition table) at this place.
    #[error("no ext4, XFS or NTFS file system found on {0}")]
    UnknownFileSystem(String),
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Random-access reads of a disk image (or of a partition of one).
pub trait ReadAt: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
            .map_err(|source| Error::Io { offset, source })
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_exact_at(offset, buf)
    }
}

/// A window of a larger image: a partition.
#[derive(Clone)]
pub struct Slice {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Slice {
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> Self {
        Self { inner, start, len }
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(Error::Io {
                offset,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes past the end of a {}-byte volume",
                        buf.len(),
                        self.len
                    ),
                ),
            });
        }
        self.inner.read_exact_at(self.start + offset, buf)
    }
}

/// Which file system a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
    Ntfs,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Ntfs => "ntfs",
        })
    }
}

/// The kind of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Directory,
    Symlink,
    /// Devices, FIFOs, sockets: listed, never extracted as data.
    Other,
}

/// A point in time: seconds since the Unix epoch (may be negative) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// A file, directory or link, as the file system describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The file system's own identity of the node (inode number, MFT record number).
    pub id: u64,
    pub kind: NodeKind,
    /// Bytes of content (a directory's is whatever the file system says).
    pub size: u64,
    /// Permission bits with setuid/setgid/sticky (`0o7777`); file systems without them (NTFS)
    /// give 0o755 for directories and 0o644 for files, as ntfs-3g shows them by default.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub atime: Timestamp,
    /// Number of names the node has (hard links), where the file system records it.
    pub links: u32,
}

/// One name in a directory (`.` and `..` are never listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub node: Node,
}

/// A mounted (in user space) file system.
pub trait FileSystem: Send + Sync {
    fn kind(&self) -> FsKind;
    /// The volume label, if it has one.
    fn label(&self) -> Option<String>;
    fn root(&self) -> Result<Node>;
    /// The entries of a directory, in the file system's order.
    fn read_dir(&self, dir: &Node) -> Result<Vec<DirEntry>>;
    /// Reads up to `buf.len()` bytes of a file from `offset`; returns how many (0 at the end).
    /// Holes read as zeros.
    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// The target of a symbolic link, as bytes.
    fn read_link(&self, link: &Node) -> Result<Vec<u8>>;
}

/// Opens the file system on a volume, recognised by its superblock.
pub fn open_filesystem(volume: Arc<dyn ReadAt>, what: &str) -> Result<Box<dyn FileSystem>> {
    if ext4::probe(&*volume)? {
        return Ok(Box::new(ext4::Ext4::open(volume)?));
    }
    if xfs::probe(&*volume)? {
        return Ok(Box::new(xfs::Xfs::open(volume)?));
    }
    if ntfs::probe(&*volume)? {
        return Ok(Box::new(ntfs::Ntfs::open(volume)?));
    }
    Err(Error::UnknownFileSystem(what.to_owned()))
}
