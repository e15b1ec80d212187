//! The block map of a data fork: which file blocks live where on disk. Small maps are a list of
//! extent records in the inode; large ones a btree whose root is in the inode. Lookups walk the
//! btree from the root each time, so nothing is held in memory but the path.

use super::bytes::{be16, be64, corrupt};
use super::inode::{ForkFormat, Inode};
use super::superblock::Superblock;
use crate::{ReadAt, Result};

const MAGIC_V4: &[u8; 4] = b"BMAP";
const MAGIC_V5: &[u8; 4] = b"BMA3";
const HEADER_V4: usize = 24;
const HEADER_V5: usize = 72;
const RECORD: usize = 16;
/// More levels than a 2^64-block file could need: a deeper tree is a loop or garbage.
const MAX_LEVELS: u16 = 10;
const NULL_BLOCK: u64 = u64::MAX;

/// A run of file blocks stored contiguously on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    /// First file block.
    pub file_block: u64,
    /// First disk block (file system block number: AG in the high bits).
    pub disk_block: u64,
    pub blocks: u64,
    /// Allocated but never written: reads as zeros.
    pub unwritten: bool,
}

impl Extent {
    fn end(&self) -> u64 {
        self.file_block + self.blocks
    }

    /// The 128-bit packed record: flag (1 bit), file offset (54), disk block (52), length (21).
    fn unpack(raw: &[u8]) -> Self {
        let l0 = be64(raw, 0);
        let l1 = be64(raw, 8);
        Extent {
            unwritten: l0 >> 63 != 0,
            file_block: (l0 & !(1 << 63)) >> 9,
            disk_block: ((l0 & 0x1ff) << 43) | (l1 >> 21),
            blocks: l1 & ((1 << 21) - 1),
        }
    }
}

pub(super) enum BlockMap {
    /// No blocks (device inodes, inline data).
    Empty,
    List(Vec<Extent>),
    Btree {
        level: u16,
        keys: Vec<u64>,
        children: Vec<u64>,
    },
}

impl BlockMap {
    pub fn of(inode: &Inode) -> Result<Self> {
        let ino = inode.ino;
        let fork = &inode.data_fork;
        match inode.format {
            ForkFormat::Device | ForkFormat::Local => Ok(BlockMap::Empty),
            ForkFormat::Extents => {
                let count = inode.extent_count;
                if count > (fork.len() / RECORD) as u64 {
                    return Err(corrupt(format!(
                        "inode {ino}: {count} extent records in a {}-byte fork",
                        fork.len()
                    )));
                }
                let extents = fork
                    .chunks_exact(RECORD)
                    .take(count as usize)
                    .map(Extent::unpack)
                    .collect::<Vec<_>>();
                check_records(&extents, &|| format!("inode {ino} extent list"))?;
                Ok(BlockMap::List(extents))
            }
            ForkFormat::Btree => {
                // The root (`xfs_bmdr_block`): level, record count, then as many keys and
                // pointers as the fork could hold, so the pointers start halfway.
                let level = be16(fork, 0);
                let count = usize::from(be16(fork, 2));
                let max = fork.len().saturating_sub(4) / 16;
                if level == 0 || level > MAX_LEVELS || count == 0 || count > max {
                    return Err(corrupt(format!(
                        "inode {ino}: block map root at level {level} with {count} records"
                    )));
                }
                let keys = (0..count).map(|i| be64(fork, 4 + 8 * i)).collect();
                let children = (0..count)
                    .map(|i| be64(fork, 4 + 8 * max + 8 * i))
                    .collect();
                Ok(BlockMap::Btree {
                    level,
                    keys,
                    children,
                })
            }
        }
    }

    /// The extent holding `file_block`, or else the first one after it; `None` past the last.
    pub fn find(
        &self,
        volume: &dyn ReadAt,
        sb: &Superblock,
        ino: u64,
        file_block: u64,
    ) -> Result<Option<Extent>> {
        match self {
            BlockMap::Empty => Ok(None),
            BlockMap::List(extents) => Ok(first_ending_after(extents, file_block)),
            BlockMap::Btree {
                level,
                keys,
                children,
            } => {
                let mut level = *level;
                let mut child = children[keys_index(keys, file_block)];
                loop {
                    let node = Node::read(volume, sb, ino, child, level - 1)?;
                    level -= 1;
                    if level > 0 {
                        child = node.children[keys_index(&node.keys, file_block)];
                        continue;
                    }
                    if let Some(extent) = first_ending_after(&node.records, file_block) {
                        return Ok(Some(extent));
                    }
                    // Past this leaf's last record: the next one, if any, begins the next leaf.
                    if node.right == NULL_BLOCK {
                        return Ok(None);
                    }
                    let next = Node::read(volume, sb, ino, node.right, 0)?;
                    let first = next.records[0];
                    if first.file_block <= file_block {
                        return Err(corrupt(format!(
                            "inode {ino} block map btree: leaf {} after the one holding file \
                             block {file_block} starts at {}",
                            node.right, first.file_block
                        )));
                    }
                    return Ok(Some(first));
                }
            }
        }
    }
}

/// The child whose subtree covers `file_block`: the last key at or below it (or the first).
fn keys_index(keys: &[u64], file_block: u64) -> usize {
    keys.partition_point(|&key| key <= file_block)
        .saturating_sub(1)
}

fn first_ending_after(extents: &[Extent], file_block: u64) -> Option<Extent> {
    let i = extents.partition_point(|e| e.end() <= file_block);
    extents.get(i).copied()
}

/// Records must be non-empty and in file order without overlap, or lookups go wrong.
fn check_records(extents: &[Extent], what: &dyn Fn() -> String) -> Result<()> {
    let mut end = 0;
    for e in extents {
        if e.blocks == 0 || e.file_block < end {
            return Err(corrupt(format!(
                "{}: extent at file block {} ({} blocks) out of order",
                what(),
                e.file_block,
                e.blocks
            )));
        }
        end = e.end();
    }
    Ok(())
}

/// One block of the block map btree below the root.
struct Node {
    keys: Vec<u64>,
    children: Vec<u64>,
    records: Vec<Extent>,
    right: u64,
}

impl Node {
    fn read(
        volume: &dyn ReadAt,
        sb: &Superblock,
        ino: u64,
        fsb: u64,
        expected_level: u16,
    ) -> Result<Self> {
        let what = || format!("inode {ino} block map btree block {fsb}");
        let offset = sb.fsb_offset(fsb, 1, &what)?;
        let mut b = vec![0u8; sb.block_size as usize];
        volume.read_exact_at(offset, &mut b)?;
        let (magic, header) = if sb.has_crc() {
            (MAGIC_V5, HEADER_V5)
        } else {
            (MAGIC_V4, HEADER_V4)
        };
        if &b[0..4] != magic {
            return Err(corrupt(format!(
                "{}: no {} magic",
                what(),
                magic.escape_ascii()
            )));
        }
        if sb.has_crc() && be64(&b, 56) != ino {
            return Err(corrupt(format!(
                "{}: owned by inode {}",
                what(),
                be64(&b, 56)
            )));
        }
        let level = be16(&b, 4);
        let count = usize::from(be16(&b, 6));
        let max = (b.len() - header) / 16;
        if level != expected_level || count == 0 || count > max {
            return Err(corrupt(format!(
                "{}: level {level} (expected {expected_level}) with {count} records",
                what()
            )));
        }
        let right = be64(&b, 16);
        let body = &b[header..];
        if level == 0 {
            let records = body
                .chunks_exact(RECORD)
                .take(count)
                .map(Extent::unpack)
                .collect::<Vec<_>>();
            check_records(&records, &what)?;
            Ok(Node {
                keys: Vec::new(),
                children: Vec::new(),
                records,
                right,
            })
        } else {
            Ok(Node {
                keys: (0..count).map(|i| be64(body, 8 * i)).collect(),
                children: (0..count).map(|i| be64(body, 8 * max + 8 * i)).collect(),
                records: Vec::new(),
                right,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(e: Extent) -> [u8; 16] {
        let l0 = (u64::from(e.unwritten) << 63) | (e.file_block << 9) | (e.disk_block >> 43);
        let l1 = (e.disk_block << 21) | e.blocks;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&l0.to_be_bytes());
        raw[8..].copy_from_slice(&l1.to_be_bytes());
        raw
    }

    #[test]
    fn extent_records_unpack_every_field() {
        let e = Extent {
            file_block: (1 << 54) - 1,
            disk_block: (1 << 52) - 3,
            blocks: (1 << 21) - 1,
            unwritten: true,
        };
        assert_eq!(Extent::unpack(&pack(e)), e);
        let e = Extent {
            file_block: 7,
            disk_block: 0x1234_5678,
            blocks: 9,
            unwritten: false,
        };
        assert_eq!(Extent::unpack(&pack(e)), e);
    }

    #[test]
    fn lookups_find_the_covering_or_next_extent() {
        let e = |file_block, blocks| Extent {
            file_block,
            disk_block: 100 + file_block,
            blocks,
            unwritten: false,
        };
        let list = [e(0, 2), e(5, 3)];
        assert_eq!(first_ending_after(&list, 1), Some(e(0, 2)));
        assert_eq!(first_ending_after(&list, 2), Some(e(5, 3)));
        assert_eq!(first_ending_after(&list, 7), Some(e(5, 3)));
        assert_eq!(first_ending_after(&list, 8), None);
        assert_eq!(keys_index(&[0, 10, 20], 15), 1);
        assert_eq!(keys_index(&[3, 10], 0), 0);
        assert!(check_records(&[e(0, 2), e(1, 3)], &|| "x".into()).is_err());
    }
}
