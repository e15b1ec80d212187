//! ntfs, read in user space (to be written).

use std::sync::Arc;

use crate::{DirEntry, Error, FileSystem, FsKind, Node, ReadAt, Result};

/// Whether the volume holds ntfs.
pub fn probe(_volume: &dyn ReadAt) -> Result<bool> {
    Ok(false)
}

pub struct Ntfs {
    _volume: Arc<dyn ReadAt>,
}

impl Ntfs {
    pub fn open(_volume: Arc<dyn ReadAt>) -> Result<Self> {
        Err(Error::Unsupported {
            fs: "ntfs",
            what: "not implemented yet".into(),
        })
    }
}

impl FileSystem for Ntfs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }
    fn label(&self) -> Option<String> {
        None
    }
    fn root(&self) -> Result<Node> {
        unimplemented!()
    }
    fn read_dir(&self, _dir: &Node) -> Result<Vec<DirEntry>> {
        unimplemented!()
    }
    fn read(&self, _file: &Node, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
        unimplemented!()
    }
    fn read_link(&self, _link: &Node) -> Result<Vec<u8>> {
        unimplemented!()
    }
}
