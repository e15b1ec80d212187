//! xfs, read in user space (to be written).

use std::sync::Arc;

use crate::{DirEntry, Error, FileSystem, FsKind, Node, ReadAt, Result};

/// Whether the volume holds xfs.
pub fn probe(_volume: &dyn ReadAt) -> Result<bool> {
    Ok(false)
}

pub struct Xfs {
    _volume: Arc<dyn ReadAt>,
}

impl Xfs {
    pub fn open(_volume: Arc<dyn ReadAt>) -> Result<Self> {
        Err(Error::Unsupported {
            fs: "xfs",
            what: "not implemented yet".into(),
        })
    }
}

impl FileSystem for Xfs {
    fn kind(&self) -> FsKind {
        FsKind::Xfs
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
