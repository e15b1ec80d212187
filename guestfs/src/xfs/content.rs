//! File contents and symbolic link targets, read through the block map.

use super::bmap::BlockMap;
use super::bytes::{be32, be64, corrupt, unsupported};
use super::inode::{ForkFormat, Inode};
use super::superblock::Superblock;
use crate::{ReadAt, Result};

/// Longest symbolic link target XFS stores (`XFS_SYMLINK_MAXLEN`).
const SYMLINK_MAX: u64 = 1024;
const SYMLINK_MAGIC: &[u8; 4] = b"XSLM";
const SYMLINK_HEADER: usize = 56;

/// Fills `buf` with the fork's bytes from `offset`: holes and unwritten extents as zeros. The
/// caller bounds the read by the file size.
pub(super) fn read_mapped(
    volume: &dyn ReadAt,
    sb: &Superblock,
    inode: &Inode,
    map: &BlockMap,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    if inode.realtime {
        return Err(unsupported(format!(
            "inode {}: file on the realtime device",
            inode.ino
        )));
    }
    let block_size = u64::from(sb.block_size);
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let file_block = pos >> sb.block_log;
        let within = pos & (block_size - 1);
        let left = buf.len() - done;
        let out = &mut buf[done..];
        let extent = map.find(volume, sb, inode.ino, file_block)?;
        let n = match extent {
            // `find` checks this; a loop that makes no progress must be impossible here.
            Some(e) if e.file_block + e.blocks <= file_block => {
                return Err(corrupt(format!(
                    "inode {}: block map gives an extent ending before file block {file_block}",
                    inode.ino
                )));
            }
            Some(e) if e.file_block <= file_block => {
                let skip = file_block - e.file_block;
                let run = (e.blocks - skip) * block_size - within;
                let n = run.min(left as u64) as usize;
                if e.unwritten {
                    out[..n].fill(0);
                } else {
                    let start = sb.fsb_offset(e.disk_block, e.blocks, &|| {
                        format!("inode {} extent at file block {}", inode.ino, e.file_block)
                    })?;
                    volume.read_exact_at(start + skip * block_size + within, &mut out[..n])?;
                }
                n
            }
            // A hole, up to the next extent or to the end of what was asked.
            Some(e) => {
                let hole = e.file_block.saturating_mul(block_size) - pos;
                let n = hole.min(left as u64) as usize;
                out[..n].fill(0);
                n
            }
            None => {
                out.fill(0);
                left
            }
        };
        done += n;
    }
    Ok(())
}

/// A regular file's bytes from `offset`; how many were read (0 at the end).
pub(super) fn read_file(
    volume: &dyn ReadAt,
    sb: &Superblock,
    inode: &Inode,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize> {
    if offset >= inode.size {
        return Ok(0);
    }
    let n = (inode.size - offset).min(buf.len() as u64) as usize;
    let buf = &mut buf[..n];
    match inode.format {
        ForkFormat::Device => buf.fill(0),
        ForkFormat::Local => {
            // Inline data is not something XFS writes for files, but it is unambiguous.
            let fork = &inode.data_fork;
            let start = (offset as usize).min(fork.len());
            let have = (fork.len() - start).min(n);
            buf[..have].copy_from_slice(&fork[start..start + have]);
            buf[have..].fill(0);
        }
        ForkFormat::Extents | ForkFormat::Btree => {
            let map = BlockMap::of(inode)?;
            read_mapped(volume, sb, inode, &map, offset, buf)?;
        }
    }
    Ok(n)
}

pub(super) fn read_link(volume: &dyn ReadAt, sb: &Superblock, inode: &Inode) -> Result<Vec<u8>> {
    let ino = inode.ino;
    let size = inode.size;
    if size == 0 || size > SYMLINK_MAX {
        return Err(corrupt(format!(
            "inode {ino}: symbolic link of {size} bytes"
        )));
    }
    let size = size as usize;
    match inode.format {
        ForkFormat::Local => inode
            .data_fork
            .get(..size)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| corrupt(format!("inode {ino}: inline link longer than its fork"))),
        ForkFormat::Extents | ForkFormat::Btree => {
            let map = BlockMap::of(inode)?;
            if !sb.has_crc() {
                let mut target = vec![0u8; size];
                read_mapped(volume, sb, inode, &map, 0, &mut target)?;
                return Ok(target);
            }
            // v5: each block starts with a header saying which bytes of the target it holds.
            let block_size = sb.block_size as usize;
            let per_block = block_size - SYMLINK_HEADER;
            let mut target = Vec::with_capacity(size);
            let mut block = vec![0u8; block_size];
            for i in 0u64.. {
                if target.len() >= size {
                    break;
                }
                read_mapped(volume, sb, inode, &map, i << sb.block_log, &mut block)?;
                let what = || format!("inode {ino} symbolic link block {i}");
                if &block[..4] != SYMLINK_MAGIC {
                    return Err(corrupt(format!("{}: no XSLM magic", what())));
                }
                let at = be32(&block, 4) as usize;
                let bytes = be32(&block, 8) as usize;
                let want = (size - target.len()).min(per_block);
                if at != target.len() || bytes != want || be64(&block, 32) != ino {
                    return Err(corrupt(format!(
                        "{}: holds {bytes} bytes at {at}, expected {want} at {}",
                        what(),
                        target.len()
                    )));
                }
                target.extend_from_slice(&block[SYMLINK_HEADER..SYMLINK_HEADER + bytes]);
            }
            Ok(target)
        }
        ForkFormat::Device => Err(corrupt(format!("inode {ino}: symbolic link without data"))),
    }
}
