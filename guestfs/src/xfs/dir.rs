//! Directories: short form (entries inside the inode) and the block, leaf and node forms, whose
//! entries all live in data blocks below 32 GiB of the directory's address space. Leaf, node
//! and free-index blocks only speed up lookups, so a listing reads the data blocks alone.

use super::bmap::BlockMap;
use super::bytes::{be16, be32, be64, corrupt};
use super::content::read_mapped;
use super::inode::{ForkFormat, Inode};
use super::superblock::{DIR_LEAF_OFFSET, Superblock};
use crate::{ReadAt, Result};

const BLOCK_MAGIC_V4: &[u8; 4] = b"XD2B";
const DATA_MAGIC_V4: &[u8; 4] = b"XD2D";
const BLOCK_MAGIC_V5: &[u8; 4] = b"XDB3";
const DATA_MAGIC_V5: &[u8; 4] = b"XDD3";
const HEADER_V4: usize = 16;
const HEADER_V5: usize = 64;
const FREE_TAG: u16 = 0xffff;

/// A name and the inode it points at.
pub(super) struct RawEntry {
    pub name: Vec<u8>,
    pub ino: u64,
}

pub(super) fn read_entries(
    volume: &dyn ReadAt,
    sb: &Superblock,
    dir: &Inode,
) -> Result<Vec<RawEntry>> {
    match dir.format {
        ForkFormat::Local => short_form(sb, dir),
        ForkFormat::Extents | ForkFormat::Btree => data_blocks(volume, sb, dir),
        ForkFormat::Device => Err(corrupt(format!(
            "directory inode {}: device data fork",
            dir.ino
        ))),
    }
}

/// `xfs_dir2_sf_hdr` (count, count of 8-byte inode numbers, parent) and packed entries:
/// name length, a 2-byte offset hint, the name, the file type if recorded, the inode number.
fn short_form(sb: &Superblock, dir: &Inode) -> Result<Vec<RawEntry>> {
    let ino = dir.ino;
    let bad = |what: String| corrupt(format!("directory inode {ino} (short form): {what}"));
    let fork = &dir.data_fork;
    let len = usize::try_from(dir.size).unwrap_or(usize::MAX);
    let b = fork
        .get(..len)
        .ok_or_else(|| bad(format!("{len} bytes in a {}-byte fork", fork.len())))?;
    if b.len() < 2 {
        return Err(bad("no header".into()));
    }
    let count = b[0];
    let ino_size = if b[1] == 0 { 4 } else { 8 };
    let mut at = 2 + ino_size;
    let ftype = usize::from(sb.has_ftype);
    let mut entries = Vec::with_capacity(usize::from(count));
    for i in 0..count {
        let name_len = usize::from(*b.get(at).ok_or_else(|| bad(format!("entry {i} cut off")))?);
        let name_at = at + 3;
        let ino_at = name_at + name_len + ftype;
        let end = ino_at + ino_size;
        if name_len == 0 || end > b.len() {
            return Err(bad(format!("entry {i} ({name_len}-byte name) cut off")));
        }
        let child = if ino_size == 4 {
            u64::from(be32(b, ino_at))
        } else {
            be64(b, ino_at)
        };
        entries.push(RawEntry {
            name: b[name_at..name_at + name_len].to_vec(),
            ino: child,
        });
        at = end;
    }
    Ok(entries)
}

/// Every data block (or the single block of a block-form directory) in file order.
fn data_blocks(volume: &dyn ReadAt, sb: &Superblock, dir: &Inode) -> Result<Vec<RawEntry>> {
    let map = BlockMap::of(dir)?;
    let dir_block = u64::from(sb.dir_block_size());
    // di_size of a directory covers its data section only.
    let end = dir.size.min(DIR_LEAF_OFFSET);
    let mut buf = vec![0u8; dir_block as usize];
    let mut entries = Vec::new();
    let mut next = 0u64; // the next directory block to look at, as a byte offset
    while next < end {
        // Jump over holes: free directory blocks are punched out.
        let Some(extent) = map.find(volume, sb, dir.ino, next >> sb.block_log)? else {
            break;
        };
        let extent_start = extent.file_block.saturating_mul(u64::from(sb.block_size));
        if extent_start > next {
            next = extent_start.div_ceil(dir_block).saturating_mul(dir_block);
            continue;
        }
        if next >= end {
            break;
        }
        read_mapped(volume, sb, dir, &map, next, &mut buf)?;
        parse_data_block(sb, dir.ino, next / dir_block, &buf, &mut entries)?;
        next += dir_block;
    }
    Ok(entries)
}

fn parse_data_block(
    sb: &Superblock,
    ino: u64,
    index: u64,
    b: &[u8],
    entries: &mut Vec<RawEntry>,
) -> Result<()> {
    let bad = |what: String| corrupt(format!("directory inode {ino} block {index}: {what}"));
    let (block_magic, data_magic, header) = if sb.has_crc() {
        (BLOCK_MAGIC_V5, DATA_MAGIC_V5, HEADER_V5)
    } else {
        (BLOCK_MAGIC_V4, DATA_MAGIC_V4, HEADER_V4)
    };
    let magic = &b[..4];
    let end = if magic == block_magic {
        // A block-form directory ends with its hash index and a tail (count, stale).
        let leaves = be32(b, b.len() - 8) as usize;
        leaves
            .checked_mul(8)
            .and_then(|l| (b.len() - 8).checked_sub(l))
            .filter(|&end| end >= header)
            .ok_or_else(|| bad(format!("{leaves} hash entries do not fit")))?
    } else if magic == data_magic {
        b.len()
    } else {
        return Err(bad(format!("magic {}", magic.escape_ascii())));
    };
    if sb.has_crc() && be64(b, 40) != ino {
        return Err(bad(format!("owned by inode {}", be64(b, 40))));
    }
    let ftype = usize::from(sb.has_ftype);
    let mut at = header;
    while at < end {
        if end - at < 8 {
            return Err(bad(format!("entry at {at} cut off")));
        }
        if be16(b, at) == FREE_TAG {
            let len = usize::from(be16(b, at + 2));
            if len < 8 || len % 8 != 0 || len > end - at {
                return Err(bad(format!("free space of {len} bytes at {at}")));
            }
            at += len;
            continue;
        }
        // inode number, name length, name, file type if recorded, 2-byte tag; 8-byte aligned,
        // so at least 16 bytes.
        if end - at < 16 {
            return Err(bad(format!("entry at {at} cut off")));
        }
        let name_len = usize::from(b[at + 8]);
        let len = (8 + 1 + name_len + ftype + 2).next_multiple_of(8);
        if name_len == 0 || len > end - at {
            return Err(bad(format!("entry at {at} ({name_len}-byte name) cut off")));
        }
        let name = &b[at + 9..at + 9 + name_len];
        if name != b"." && name != b".." {
            entries.push(RawEntry {
                name: name.to_vec(),
                ino: be64(b, at),
            });
        }
        at += len;
    }
    Ok(())
}
