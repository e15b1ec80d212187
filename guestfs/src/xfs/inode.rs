//! On-disk inodes (`xfs_dinode`): the core fields a restore needs and the data fork.

use super::bytes::{be16, be32, be64, corrupt};
use super::superblock::Superblock;
use crate::{Node, NodeKind, ReadAt, Result, Timestamp};

const MAGIC: u16 = 0x494e; // "IN"
const CORE_V2: usize = 100;
const CORE_V3: usize = 176;

// di_flags / di_flags2.
const FLAG_REALTIME: u16 = 0x1;
const FLAG2_BIGTIME: u64 = 1 << 3;
const FLAG2_NREXT64: u64 = 1 << 4;

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;

/// How a fork stores its content (`di_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ForkFormat {
    /// Device numbers: no content.
    Device,
    /// The bytes themselves, in the inode.
    Local,
    /// An array of extent records in the inode.
    Extents,
    /// The root of a block map btree in the inode.
    Btree,
}

#[derive(Debug, Clone)]
pub(super) struct Inode {
    pub ino: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub realtime: bool,
    pub format: ForkFormat,
    /// Data fork extent records, as the inode counts them.
    pub extent_count: u64,
    /// The bytes of the data fork inside the inode.
    pub data_fork: Vec<u8>,
}

impl Inode {
    pub fn read(volume: &dyn ReadAt, sb: &Superblock, ino: u64) -> Result<Self> {
        let offset = inode_offset(sb, ino)?;
        let mut buf = vec![0u8; usize::from(sb.inode_size)];
        volume.read_exact_at(offset, &mut buf)?;
        Self::parse(sb, ino, &buf)
    }

    fn parse(sb: &Superblock, ino: u64, b: &[u8]) -> Result<Self> {
        let bad = |what: String| corrupt(format!("inode {ino}: {what}"));
        if be16(b, 0) != MAGIC {
            return Err(bad(format!("magic {:#06x}, not IN", be16(b, 0))));
        }
        let version = b[4];
        let core = match (version, sb.has_crc()) {
            (1 | 2, false) => CORE_V2,
            (3, true) => CORE_V3,
            _ => {
                return Err(bad(format!(
                    "version {version} on a v{} file system",
                    sb.version
                )));
            }
        };
        if version == 3 && be64(b, 152) != ino {
            return Err(bad(format!("records inode number {}", be64(b, 152))));
        }
        let flags2 = if version == 3 { be64(b, 120) } else { 0 };
        let bigtime = flags2 & FLAG2_BIGTIME != 0;
        let format = match b[5] {
            0 => ForkFormat::Device,
            1 => ForkFormat::Local,
            2 => ForkFormat::Extents,
            3 => ForkFormat::Btree,
            other => return Err(bad(format!("data fork format {other}"))),
        };
        let extent_count = if flags2 & FLAG2_NREXT64 != 0 {
            be64(b, 24)
        } else {
            u64::from(be32(b, 76))
        };
        // di_forkoff: where the attribute fork starts, in 8-byte units; 0 when there is none.
        let literal = b.len() - core;
        let data_fork_size = match usize::from(b[82]) * 8 {
            0 => literal,
            size if size <= literal => size,
            size => return Err(bad(format!("attribute fork at {size} of {literal} bytes"))),
        };
        Ok(Inode {
            ino,
            mode: be16(b, 2),
            uid: be32(b, 8),
            gid: be32(b, 12),
            nlink: if version == 1 {
                u32::from(be16(b, 6))
            } else {
                be32(b, 16)
            },
            size: be64(b, 56),
            atime: timestamp(b, 32, bigtime),
            mtime: timestamp(b, 40, bigtime),
            realtime: be16(b, 90) & FLAG_REALTIME != 0,
            format,
            extent_count,
            data_fork: b[core..core + data_fork_size].to_vec(),
        })
    }

    pub fn kind(&self) -> NodeKind {
        match self.mode & S_IFMT {
            S_IFREG => NodeKind::File,
            S_IFDIR => NodeKind::Directory,
            S_IFLNK => NodeKind::Symlink,
            _ => NodeKind::Other,
        }
    }

    pub fn node(&self) -> Node {
        Node {
            id: self.ino,
            kind: self.kind(),
            size: self.size,
            mode: u32::from(self.mode & 0o7777),
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            atime: self.atime,
            links: self.nlink,
        }
    }
}

/// Where inode `ino` is: its AG, the block in the AG, the slot in the block.
fn inode_offset(sb: &Superblock, ino: u64) -> Result<u64> {
    let ag_ino_log = sb.ag_ino_log();
    let ag = ino.checked_shr(ag_ino_log).unwrap_or(0);
    let ag_ino = ino & ((1u64 << ag_ino_log) - 1);
    let ag_block = ag_ino >> sb.inodes_per_block_log;
    let slot = ag_ino & ((1u64 << sb.inodes_per_block_log) - 1);
    let outside = || corrupt(format!("inode number {ino} is outside the file system"));
    if ag >= u64::from(sb.ag_count) || ag_block >= u64::from(sb.ag_blocks) {
        return Err(outside());
    }
    let linear = ag * u64::from(sb.ag_blocks) + ag_block;
    if linear >= sb.dblocks {
        return Err(outside());
    }
    Ok((linear << sb.block_log) + slot * u64::from(sb.inode_size))
}

/// A timestamp: seconds (signed 32-bit) and nanoseconds, or with big timestamps one 64-bit count
/// of nanoseconds since the smallest 32-bit time (1901-12-13).
fn timestamp(b: &[u8], at: usize, bigtime: bool) -> Timestamp {
    const NANOS: u64 = 1_000_000_000;
    const BIGTIME_EPOCH_OFFSET: i64 = 1 << 31;
    if bigtime {
        let raw = be64(b, at);
        Timestamp {
            secs: (raw / NANOS) as i64 - BIGTIME_EPOCH_OFFSET,
            nanos: (raw % NANOS) as u32,
        }
    } else {
        Timestamp {
            secs: i64::from(be32(b, at) as i32),
            nanos: be32(b, at + 4).min(NANOS as u32 - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_timestamps_count_nanoseconds_from_1901() {
        let raw = ((1_700_000_000u64 + (1 << 31)) * 1_000_000_000 + 123).to_be_bytes();
        assert_eq!(
            timestamp(&raw, 0, true),
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123
            }
        );
        let raw = [0x80, 0, 0, 0, 0, 0, 0, 5];
        assert_eq!(
            timestamp(&raw, 0, false),
            Timestamp {
                secs: -(1 << 31),
                nanos: 5
            }
        );
    }
}
