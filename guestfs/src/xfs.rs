//! XFS, read in user space: v4 and v5 (CRC) file systems, short-form, block, leaf and node
//! directories, extent-list and btree block maps, inline and remote symbolic links.
//!
//! Reads what is on disk: a log that was not replayed (a crash-consistent snapshot of a running
//! guest) is not looked at, so the last changes before the snapshot may be missing. Checksums are
//! not verified; magic numbers, owners and every bound are. Files on a realtime device are refused.

mod bmap;
mod bytes;
mod content;
mod dir;
mod inode;
mod superblock;

use std::sync::Arc;

use crate::{DirEntry, Error, FileSystem, FsKind, Node, NodeKind, ReadAt, Result};
use inode::Inode;
use superblock::Superblock;

/// Whether the volume holds XFS (the superblock magic at offset 0).
pub fn probe(volume: &dyn ReadAt) -> Result<bool> {
    if volume.size() < 512 {
        return Ok(false);
    }
    let mut magic = [0u8; 4];
    volume.read_exact_at(0, &mut magic)?;
    Ok(&magic == superblock::MAGIC)
}

/// An XFS volume opened for reading. Holds only the superblock: every call reads the inodes and
/// blocks it needs, so the image may be large and nothing grows with use.
pub struct Xfs {
    volume: Arc<dyn ReadAt>,
    sb: Superblock,
}

impl Xfs {
    pub fn open(volume: Arc<dyn ReadAt>) -> Result<Self> {
        let sb = Superblock::read(&*volume)?;
        Ok(Xfs { volume, sb })
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        Inode::read(&*self.volume, &self.sb, ino)
    }
}

impl FileSystem for Xfs {
    fn kind(&self) -> FsKind {
        FsKind::Xfs
    }

    fn label(&self) -> Option<String> {
        self.sb.label.clone()
    }

    fn root(&self) -> Result<Node> {
        Ok(self.inode(self.sb.root_ino)?.node())
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<DirEntry>> {
        let inode = self.inode(dir.id)?;
        if inode.kind() != NodeKind::Directory {
            return Err(Error::NotADirectory(format!("inode {}", dir.id)));
        }
        dir::read_entries(&*self.volume, &self.sb, &inode)?
            .into_iter()
            .map(|entry| {
                Ok(DirEntry {
                    name: String::from_utf8_lossy(&entry.name).into_owned(),
                    node: self.inode(entry.ino)?.node(),
                })
            })
            .collect()
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.inode(file.id)?;
        content::read_file(&*self.volume, &self.sb, &inode, offset, buf)
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        let inode = self.inode(link.id)?;
        if inode.kind() != NodeKind::Symlink {
            return Err(bytes::corrupt(format!(
                "inode {}: not a symbolic link",
                link.id
            )));
        }
        content::read_link(&*self.volume, &self.sb, &inode)
    }
}
