//! The ext3/ext4 journal (jbd2), replayed in memory.
//!
//! A snapshot of a mounted file system (what a backup of a running VM is, unless the guest was
//! quiesced) has transactions that are committed in the journal but not yet written to their
//! home blocks; e2fsck or the kernel would replay them at mount. Here they are never written
//! back: the result is a map from file system block to the journal block holding its newest
//! committed copy, and every read goes through it. Transactions without a commit block are
//! ignored, revoke records are honoured, as jbd2's recovery does. Fast-commit blocks
//! (ext4's `fast_commit` feature) are not replayed: what they describe is also in the next
//! full commit, and is lost only when the guest crashed between the two.

use std::collections::{BTreeMap, HashMap};

use super::{Ext4, Run, corrupt};
use crate::Result;

const JBD2_MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR: u32 = 1;
const COMMIT: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
const REVOKE: u32 = 5;

const FEATURE_64BIT: u32 = 0x2;
const FEATURE_CSUM_V2: u32 = 0x8;
const FEATURE_CSUM_V3: u32 = 0x10;
const FEATURE_FAST_COMMIT: u32 = 0x20;

const TAG_ESCAPED: u32 = 0x1;
const TAG_SAME_UUID: u32 = 0x2;
const TAG_LAST: u32 = 0x8;

/// Where the newest committed copy of a file system block is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Copy {
    /// The file system block (in the journal's file) holding the copy.
    at: u64,
    /// The copy's first four bytes were the journal's magic and were zeroed when written.
    escaped: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a block's copy from the journal.
pub(super) fn read_copy(fs: &Ext4, copy: &Copy, buf: &mut [u8]) -> Result<()> {
    fs.volume.read_exact_at(copy.at * fs.block_size, buf)?;
    if copy.escaped {
        buf[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
    }
    Ok(())
}

/// The blocks that committed transactions in the journal (inode `ino`) hold newer copies of.
/// An empty map for a clean journal.
pub(super) fn committed_blocks(fs: &Ext4, ino: u64) -> Result<BTreeMap<u64, Copy>> {
    let inode = fs.read_inode(ino)?;
    let bs = fs.block_size as usize;
    let journal_blocks = inode.size / fs.block_size;
    // Journal block -> file system block.
    let locate = |lblk: u64| -> Result<u64> {
        match fs.map(&inode, lblk)? {
            Run::Data { phys, .. } if lblk < journal_blocks => Ok(phys),
            _ => Err(corrupt(format!("journal block {lblk} is not allocated"))),
        }
    };
    let mut block = vec![0u8; bs];
    fs.read_block(locate(0)?, &mut block)?;
    let blocktype = be32(&block, 4);
    if be32(&block, 0) != JBD2_MAGIC || !matches!(blocktype, SUPERBLOCK_V1 | SUPERBLOCK_V2) {
        return Err(corrupt("journal superblock has no jbd2 magic"));
    }
    if be32(&block, 0xC) as usize != bs {
        return Err(corrupt(format!(
            "journal block size {} is not the file system's {bs}",
            be32(&block, 0xC)
        )));
    }
    let maxlen = (be32(&block, 0x10) as u64).min(journal_blocks);
    let first = be32(&block, 0x14) as u64;
    let mut sequence = be32(&block, 0x18);
    let start = be32(&block, 0x1C) as u64;
    if start == 0 {
        return Ok(BTreeMap::new());
    }
    let incompat = if blocktype == SUPERBLOCK_V2 {
        be32(&block, 0x28)
    } else {
        0
    };
    let is64 = incompat & FEATURE_64BIT != 0;
    let csum_v3 = incompat & FEATURE_CSUM_V3 != 0;
    let csum_v2 = incompat & FEATURE_CSUM_V2 != 0;
    // The log wraps before the fast-commit area at the journal's end.
    let mut last = maxlen;
    if incompat & FEATURE_FAST_COMMIT != 0 {
        let fc = match be32(&block, 0x54) {
            0 => 256,
            n => n as u64,
        };
        last = last.saturating_sub(fc);
    }
    if first == 0 || first >= last || start < first || start >= last {
        return Err(corrupt(format!(
            "journal log [{first}, {last}) does not hold its start {start}"
        )));
    }
    let tag_bytes = if csum_v3 {
        16
    } else {
        let base = 12 + if csum_v2 { 2 } else { 0 };
        if is64 { base } else { base - 4 }
    };
    let tags_end = bs - if csum_v2 || csum_v3 { 4 } else { 0 };
    let wrap = |b: u64| if b >= last { first + (b - last) } else { b };

    let mut replay: BTreeMap<u64, Copy> = BTreeMap::new();
    let mut revoked: HashMap<u64, u32> = HashMap::new();
    // The transaction being read: its (target, copy) pairs and revokes, kept until its commit.
    let mut pending: Vec<(u64, Copy)> = Vec::new();
    let mut pending_revokes: Vec<u64> = Vec::new();
    let mut committed: Vec<(u32, Vec<(u64, Copy)>)> = Vec::new();
    let mut next = start;
    let mut steps = 0;
    // Every journal block is visited at most once per pass round the log.
    while steps < last - first {
        fs.read_block(locate(next)?, &mut block)?;
        if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != sequence {
            break;
        }
        match be32(&block, 4) {
            DESCRIPTOR => {
                let mut at = 12;
                let mut data = next;
                while at + tag_bytes <= tags_end {
                    let tag = &block[at..at + tag_bytes];
                    let (mut target, flags) = if csum_v3 {
                        (be32(tag, 0) as u64, be32(tag, 4))
                    } else {
                        (
                            be32(tag, 0) as u64,
                            u16::from_be_bytes([tag[6], tag[7]]) as u32,
                        )
                    };
                    if is64 {
                        // blocknr_high is at byte 8 in both tag layouts.
                        target |= (be32(tag, 8) as u64) << 32;
                    }
                    data = wrap(data + 1);
                    steps += 1;
                    pending.push((
                        target,
                        Copy {
                            at: locate(data)?,
                            escaped: flags & TAG_ESCAPED != 0,
                        },
                    ));
                    at += tag_bytes;
                    if flags & TAG_SAME_UUID == 0 {
                        at += 16;
                    }
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
                next = data;
            }
            COMMIT => {
                committed.push((sequence, std::mem::take(&mut pending)));
                for b in pending_revokes.drain(..) {
                    let seq = revoked.entry(b).or_insert(sequence);
                    *seq = (*seq).max(sequence);
                }
                sequence = sequence.wrapping_add(1);
            }
            REVOKE => {
                let used = (be32(&block, 12) as usize).min(tags_end);
                let width = if is64 { 8 } else { 4 };
                let mut at = 16;
                while at + width <= used {
                    let b = if is64 {
                        u64::from_be_bytes(block[at..at + 8].try_into().expect("8 bytes"))
                    } else {
                        be32(&block, at) as u64
                    };
                    pending_revokes.push(b);
                    at += width;
                }
            }
            _ => break,
        }
        next = wrap(next + 1);
        steps += 1;
    }
    for (seq, blocks) in committed {
        for (target, copy) in blocks {
            // A revoke in this transaction or a later one cancels the copy.
            if revoked
                .get(&target)
                .is_some_and(|&r| r.wrapping_sub(seq) as i32 >= 0)
            {
                continue;
            }
            if target < fs.blocks_count {
                replay.insert(target, copy);
            }
        }
    }
    Ok(replay)
}
