//! ext2, ext3 and ext4, read in user space.
//!
//! Written here rather than taken from `ext4-view` (which reads well) because this crate's
//! interface is by inode and shared across threads: ext4-view is path-based, `Rc`-based (not
//! `Send`), gives no inode numbers or link counts, and reads one block per call with a seek that
//! walks the file from its start. What this reader covers: 32- and 64-bit group descriptors
//! (with meta_bg), extent trees of any depth (unwritten extents read as zeros), ext2/3 block
//! maps, inline data, linear reading of hashed directories, fast and slow symlinks, nanosecond
//! timestamps, and replay of a committed but not yet checkpointed journal (see `journal.rs`),
//! which every crash-consistent snapshot of a mounted ext3/4 has.

mod journal;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::{DirEntry, Error, FileSystem, FsKind, Node, NodeKind, ReadAt, Result, Timestamp};

const SUPERBLOCK: u64 = 1024;
const MAGIC: u16 = 0xEF53;

// Incompatible features (what must be understood to read the file system).
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_DIRDATA: u32 = 0x1000;
/// extents, mmp, flex_bg, ea_inode, csum_seed, largedir, inline_data, encrypt, casefold: all
/// readable (encrypted inodes are refused one by one).
const INCOMPAT_READABLE: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | 0x40
    | INCOMPAT_64BIT
    | 0x100
    | 0x200
    | 0x400
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;

// Inode flags.
const FL_ENCRYPT: u32 = 0x800;
const FL_HUGE_FILE: u32 = 0x40000;
const FL_EXTENTS: u32 = 0x80000;
const FL_INLINE_DATA: u32 = 0x1000_0000;

const EXTENT_MAGIC: u16 = 0xF30A;
/// The kernel's own bound on extent tree depth.
const EXTENT_MAX_DEPTH: u16 = 5;
/// Longer symlink targets are not Linux's (PATH_MAX).
const SYMLINK_MAX: u64 = 4096;

/// Whether the volume holds ext2, ext3 or ext4.
pub fn probe(volume: &dyn ReadAt) -> Result<bool> {
    if volume.size() < SUPERBLOCK + 1024 {
        return Ok(false);
    }
    let mut magic = [0u8; 2];
    volume.read_exact_at(SUPERBLOCK + 0x38, &mut magic)?;
    Ok(u16::from_le_bytes(magic) == MAGIC)
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt {
        fs: "ext4",
        what: what.into(),
    }
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub struct Ext4 {
    volume: Arc<dyn ReadAt>,
    block_size: u64,
    blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    /// The first block of each group's inode table.
    inode_tables: Vec<u64>,
    filetype: bool,
    huge_file: bool,
    label: Option<String>,
    /// Blocks whose newest committed copy is in the journal: file system block -> where to
    /// read it (see `journal.rs`).
    replayed: BTreeMap<u64, journal::Copy>,
    /// The last inode read: a file is read chunk by chunk, each chunk by inode number.
    last_inode: Mutex<Option<Arc<Inode>>>,
}

/// An inode as stored, with the fields this reader uses.
#[derive(Debug)]
struct Inode {
    ino: u64,
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Timestamp,
    mtime: Timestamp,
    links: u32,
    flags: u32,
    /// Blocks in use (data, tree and xattr), in 512-byte units.
    sectors: u64,
    file_acl: u64,
    /// `i_block`: extent tree root, block map, inline data or a fast symlink's target.
    block: [u8; 60],
    /// The in-inode extended attributes (after `i_extra_isize`), for inline data.
    xattrs: Vec<u8>,
}

/// A stretch of a file from a logical block: `len` blocks stored from `phys`, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Hole { len: u64 },
    Data { phys: u64, len: u64 },
}

impl Ext4 {
    pub fn open(volume: Arc<dyn ReadAt>) -> Result<Self> {
        if !probe(&*volume)? {
            return Err(corrupt("no ext2/3/4 superblock magic at byte 1080"));
        }
        let mut sb = [0u8; 1024];
        volume.read_exact_at(SUPERBLOCK, &mut sb)?;
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        for (bit, name) in [
            (INCOMPAT_COMPRESSION, "compression"),
            (
                INCOMPAT_JOURNAL_DEV,
                "external journal device (this is the journal, not a file system)",
            ),
            (INCOMPAT_DIRDATA, "dirdata"),
        ] {
            if incompat & bit != 0 {
                return Err(Error::Unsupported {
                    fs: "ext4",
                    what: format!("feature {name}"),
                });
            }
        }
        if incompat & !INCOMPAT_READABLE != 0 {
            return Err(Error::Unsupported {
                fs: "ext4",
                what: format!(
                    "unknown incompatible features 0x{:x}",
                    incompat & !INCOMPAT_READABLE
                ),
            });
        }
        let log_block = le32(&sb, 0x18);
        if log_block > 6 {
            return Err(corrupt(format!("block size 1024 << {log_block}")));
        }
        let block_size = 1024u64 << log_block;
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_count = le32(&sb, 0x4) as u64
            | if is64 {
                (le32(&sb, 0x150) as u64) << 32
            } else {
                0
            };
        let first_data_block = le32(&sb, 0x14) as u64;
        let blocks_per_group = le32(&sb, 0x20) as u64;
        let inodes_per_group = le32(&sb, 0x28);
        let inodes_count = le32(&sb, 0x0);
        let rev = le32(&sb, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            le16(&sb, 0x58) as u64
        };
        if blocks_per_group == 0 || blocks_per_group > 8 * block_size || inodes_per_group == 0 {
            return Err(corrupt(format!(
                "{blocks_per_group} blocks and {inodes_per_group} inodes per group"
            )));
        }
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        if blocks_count <= first_data_block
            || blocks_count.saturating_mul(block_size) > volume.size()
        {
            return Err(corrupt(format!(
                "{blocks_count} blocks of {block_size} bytes do not fit the {}-byte volume",
                volume.size()
            )));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if groups * inodes_per_group as u64 > u32::MAX as u64 + inodes_per_group as u64 {
            return Err(corrupt(format!(
                "{groups} groups of {inodes_per_group} inodes"
            )));
        }
        let desc_size = if is64 { le16(&sb, 0xFE) as u64 } else { 32 };
        if !(32..=block_size).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(corrupt(format!("group descriptor size {desc_size}")));
        }
        let label = {
            let raw = &sb[0x78..0x88];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let text = String::from_utf8_lossy(&raw[..end]).into_owned();
            (!text.is_empty()).then_some(text)
        };

        let mut fs = Ext4 {
            volume,
            block_size,
            blocks_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            inode_tables: Vec::new(),
            filetype: incompat & INCOMPAT_FILETYPE != 0,
            huge_file: ro_compat & RO_COMPAT_HUGE_FILE != 0,
            label,
            replayed: BTreeMap::new(),
            last_inode: Mutex::new(None),
        };
        let geometry = Geometry {
            first_data_block,
            blocks_per_group,
            desc_size,
            sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            meta_bg: incompat & INCOMPAT_META_BG != 0,
            first_meta_bg: le32(&sb, 0x104) as u64,
        };
        // The journal may hold newer copies of the group descriptors themselves: read them
        // once to find the journal inode, replay, then read them again through the overlay.
        fs.inode_tables = fs.read_inode_tables(&geometry, groups)?;
        let journal_inode = le32(&sb, 0xE0) as u64;
        let has_journal = le32(&sb, 0x5C) & 0x4 != 0;
        if has_journal && journal_inode != 0 {
            fs.replayed = journal::committed_blocks(&fs, journal_inode)?;
            if !fs.replayed.is_empty() {
                fs.inode_tables = fs.read_inode_tables(&geometry, groups)?;
            }
        }
        Ok(fs)
    }

    fn read_inode_tables(&self, g: &Geometry, groups: u64) -> Result<Vec<u64>> {
        let per_block = self.block_size / g.desc_size;
        let mut tables = Vec::with_capacity(groups as usize);
        let mut block = vec![0u8; self.block_size as usize];
        for nr in 0..groups.div_ceil(per_block) {
            let at = g.descriptor_block(nr, per_block, self.block_size);
            self.read_block(at, &mut block)?;
            for d in block.chunks_exact(g.desc_size as usize) {
                if tables.len() as u64 == groups {
                    break;
                }
                let mut table = le32(d, 0x8) as u64;
                if g.desc_size >= 64 {
                    table |= (le32(d, 0x28) as u64) << 32;
                }
                tables.push(table);
            }
        }
        Ok(tables)
    }

    /// Reads whole blocks from `block`, through the journal's newer copies.
    fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        self.read_in_block(block, 0, buf)
    }

    /// Reads `buf.len()` bytes from `within` bytes into `block` (may run on into the next
    /// blocks), through the journal's newer copies.
    fn read_in_block(&self, block: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let blocks = (within + buf.len() as u64).div_ceil(self.block_size);
        if block
            .checked_add(blocks)
            .is_none_or(|end| end > self.blocks_count)
        {
            return Err(corrupt(format!(
                "block {block} (+{blocks}) is past the end of the file system ({} blocks)",
                self.blocks_count
            )));
        }
        let offset = block * self.block_size + within;
        self.volume.read_exact_at(offset, buf)?;
        if self.replayed.is_empty() {
            return Ok(());
        }
        for (&b, copy) in self.replayed.range(block..block + blocks) {
            // The overlap of block `b` with [offset, offset + len).
            let (b_start, b_end) = (b * self.block_size, (b + 1) * self.block_size);
            let start = b_start.max(offset);
            let end = b_end.min(offset + buf.len() as u64);
            if start >= end {
                continue;
            }
            let mut copy_buf = vec![0u8; self.block_size as usize];
            journal::read_copy(self, copy, &mut copy_buf)?;
            buf[(start - offset) as usize..(end - offset) as usize]
                .copy_from_slice(&copy_buf[(start - b_start) as usize..(end - b_start) as usize]);
        }
        Ok(())
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        if let Ok(last) = self.last_inode.lock()
            && let Some(inode) = last.as_ref().filter(|i| i.ino == ino)
        {
            return Ok(inode.clone());
        }
        let inode = Arc::new(self.read_inode(ino)?);
        if let Ok(mut last) = self.last_inode.lock() {
            *last = Some(inode.clone());
        }
        Ok(inode)
    }

    fn read_inode(&self, ino: u64) -> Result<Inode> {
        if ino == 0 || ino > self.inodes_count as u64 {
            return Err(corrupt(format!(
                "inode {ino} out of range (1..={})",
                self.inodes_count
            )));
        }
        let group = (ino - 1) / self.inodes_per_group as u64;
        let index = (ino - 1) % self.inodes_per_group as u64;
        let table = *self
            .inode_tables
            .get(group as usize)
            .ok_or_else(|| corrupt(format!("inode {ino} is in group {group}, past the last")))?;
        let byte = index * self.inode_size;
        let mut raw = vec![0u8; self.inode_size as usize];
        self.read_in_block(
            table + byte / self.block_size,
            byte % self.block_size,
            &mut raw,
        )?;
        let extra = if self.inode_size > 128 {
            (le16(&raw, 0x80) as u64).min(self.inode_size - 128)
        } else {
            0
        };
        // A timestamp with its `_extra` word (epoch bits and nanoseconds) when the inode is
        // large enough to hold it.
        let time = |base: usize, extra_at: usize| {
            let mut t = Timestamp {
                secs: le32(&raw, base) as i32 as i64,
                nanos: 0,
            };
            if 128 + extra >= extra_at as u64 + 4 {
                let e = le32(&raw, extra_at);
                t.secs += ((e & 3) as i64) << 32;
                t.nanos = e >> 2;
                if t.nanos >= 1_000_000_000 {
                    t.nanos = 0;
                }
            }
            t
        };
        let flags = le32(&raw, 0x20);
        let mut sectors = le32(&raw, 0x1C) as u64;
        if self.huge_file {
            sectors |= (le16(&raw, 0x74) as u64) << 32;
            if flags & FL_HUGE_FILE != 0 {
                sectors = sectors.saturating_mul(self.block_size / 512);
            }
        }
        let xattr_start = (128 + extra) as usize;
        Ok(Inode {
            ino,
            mode: le16(&raw, 0),
            uid: le16(&raw, 0x2) as u32 | (le16(&raw, 0x78) as u32) << 16,
            gid: le16(&raw, 0x18) as u32 | (le16(&raw, 0x7A) as u32) << 16,
            size: le32(&raw, 0x4) as u64 | (le32(&raw, 0x6C) as u64) << 32,
            atime: time(0x8, 0x8C),
            mtime: time(0x10, 0x88),
            links: le16(&raw, 0x1A) as u32,
            flags,
            sectors,
            file_acl: le32(&raw, 0x68) as u64 | (le16(&raw, 0x76) as u64) << 32,
            block: raw[0x28..0x28 + 60].try_into().expect("60 bytes"),
            xattrs: raw[xattr_start.min(raw.len())..].to_vec(),
        })
    }

    fn node(&self, inode: &Inode) -> Node {
        let kind = match inode.mode & 0xF000 {
            0x8000 => NodeKind::File,
            0x4000 => NodeKind::Directory,
            0xA000 => NodeKind::Symlink,
            _ => NodeKind::Other,
        };
        Node {
            id: inode.ino,
            kind,
            size: inode.size,
            mode: (inode.mode & 0o7777) as u32,
            uid: inode.uid,
            gid: inode.gid,
            mtime: inode.mtime,
            atime: inode.atime,
            links: inode.links,
        }
    }

    /// Where logical block `lblk` of a file is stored, and for how many blocks on.
    fn map(&self, inode: &Inode, lblk: u64) -> Result<Run> {
        if inode.flags & FL_EXTENTS != 0 {
            self.map_extents(inode.ino, &inode.block, lblk, 1 << 32, EXTENT_MAX_DEPTH + 1)
        } else {
            self.map_indirect(inode, lblk)
        }
    }

    /// Looks `lblk` up in an extent tree node; `limit` is the first logical block the node
    /// does not cover (from its parent), so a hole at the end of a leaf has a length.
    fn map_extents(
        &self,
        ino: u64,
        node: &[u8],
        lblk: u64,
        limit: u64,
        budget: u16,
    ) -> Result<Run> {
        let bad = |what: String| corrupt(format!("inode {ino}: extent tree: {what}"));
        if node.len() < 12 || le16(node, 0) != EXTENT_MAGIC {
            return Err(bad("bad node magic".into()));
        }
        let (entries, depth) = (le16(node, 2) as usize, le16(node, 6));
        if 12 + 12 * entries > node.len() {
            return Err(bad(format!("{entries} entries do not fit the node")));
        }
        if depth >= budget {
            return Err(bad(format!(
                "depth {depth} where at most {} remain",
                budget.saturating_sub(1)
            )));
        }
        let entry = |i: usize| &node[12 + 12 * i..24 + 12 * i];
        if depth == 0 {
            for i in 0..entries {
                let e = entry(i);
                let start = le32(e, 0) as u64;
                let raw_len = le16(e, 4) as u64;
                let (len, unwritten) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                if lblk < start {
                    return Ok(Run::Hole { len: start - lblk });
                }
                if lblk < start + len {
                    let rest = start + len - lblk;
                    if unwritten {
                        return Ok(Run::Hole { len: rest });
                    }
                    let phys = (le16(e, 6) as u64) << 32 | le32(e, 8) as u64;
                    return Ok(Run::Data {
                        phys: phys + (lblk - start),
                        len: rest,
                    });
                }
            }
            return Ok(Run::Hole {
                len: limit.saturating_sub(lblk).max(1),
            });
        }
        // The last index starting at or before lblk.
        let Some(i) = (0..entries)
            .rev()
            .find(|&i| le32(entry(i), 0) as u64 <= lblk)
        else {
            let next = if entries > 0 {
                le32(entry(0), 0) as u64
            } else {
                limit
            };
            return Ok(Run::Hole {
                len: next.saturating_sub(lblk).max(1),
            });
        };
        let e = entry(i);
        let child = (le16(e, 8) as u64) << 32 | le32(e, 4) as u64;
        let child_limit = if i + 1 < entries {
            le32(entry(i + 1), 0) as u64
        } else {
            limit
        };
        let mut block = vec![0u8; self.block_size as usize];
        self.read_block(child, &mut block)?;
        if block.len() >= 12 && le16(&block, 0) == EXTENT_MAGIC && le16(&block, 6) + 1 != depth {
            return Err(bad(format!(
                "child of a depth-{depth} node has depth {}",
                le16(&block, 6)
            )));
        }
        self.map_extents(ino, &block, lblk, child_limit, depth)
    }

    /// ext2/3 block maps: 12 direct blocks, then single, double and triple indirect blocks.
    /// A run goes on while the pointers in one block stay contiguous (or stay holes).
    fn map_indirect(&self, inode: &Inode, lblk: u64) -> Result<Run> {
        let per = self.block_size / 4;
        let direct: Vec<u32> = (0..15).map(|i| le32(&inode.block, 4 * i)).collect();
        if lblk < 12 {
            return Ok(run_of(&direct[..12], lblk as usize));
        }
        // Which tree, and the index at each of its levels.
        let mut rest = lblk - 12;
        let mut span = per;
        let mut levels = 1;
        while rest >= span {
            rest -= span;
            levels += 1;
            if levels > 3 {
                return Err(corrupt(format!(
                    "inode {}: block {lblk} is past what a block map can address",
                    inode.ino
                )));
            }
            span *= per;
        }
        let mut ptr = direct[11 + levels as usize] as u64;
        let mut pointers = vec![0u8; self.block_size as usize];
        for level in (0..levels).rev() {
            // Each pointer at this level covers per^level blocks.
            let cover = per.pow(level);
            if ptr == 0 {
                return Ok(Run::Hole {
                    len: span - (rest % span),
                });
            }
            self.read_block(ptr, &mut pointers)?;
            let index = (rest / cover) as usize;
            if level == 0 {
                let table: Vec<u32> = pointers.chunks_exact(4).map(|c| le32(c, 0)).collect();
                return Ok(run_of(&table, index));
            }
            ptr = le32(&pointers, 4 * index) as u64;
            rest %= cover;
            span = cover;
        }
        unreachable!("level 0 returns")
    }

    /// The content of an inline-data inode: `i_block`, then the `system.data` attribute.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.block.to_vec();
        let x = &inode.xattrs;
        if x.len() >= 4 && le32(x, 0) == 0xEA02_0000 {
            let entries = &x[4..];
            let mut at = 0;
            while at + 16 <= entries.len() && le32(entries, at) != 0 {
                let name_len = entries[at] as usize;
                let index = entries[at + 1];
                let value_offs = le16(entries, at + 2) as usize;
                let value_size = le32(entries, at + 8) as usize;
                let name = entries.get(at + 16..at + 16 + name_len);
                if index == 7 && name == Some(b"data") {
                    let value = entries
                        .get(value_offs..value_offs.saturating_add(value_size))
                        .ok_or_else(|| {
                            corrupt(format!(
                                "inode {}: inline data outside the inode",
                                inode.ino
                            ))
                        })?;
                    data.extend_from_slice(value);
                    break;
                }
                at += (16 + name_len + 3) & !3;
            }
        }
        Ok(data)
    }

    fn check_readable(&self, inode: &Inode) -> Result<()> {
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Error::Unsupported {
                fs: "ext4",
                what: format!("inode {} is encrypted (fscrypt)", inode.ino),
            });
        }
        Ok(())
    }

    fn read_inode_data(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (inode.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        if inode.flags & FL_INLINE_DATA != 0 {
            let data = self.inline_data(inode)?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = data.get(offset as usize + i).copied().unwrap_or(0);
            }
            return Ok(n);
        }
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let (lblk, within) = (pos / self.block_size, pos % self.block_size);
            let run = self.map(inode, lblk)?;
            let run_blocks = match run {
                Run::Hole { len } | Run::Data { len, .. } => len.max(1),
            };
            let take = (run_blocks.saturating_mul(self.block_size) - within).min((n - done) as u64)
                as usize;
            let chunk = &mut buf[done..done + take];
            match run {
                Run::Hole { .. } => chunk.fill(0),
                Run::Data { phys, .. } => self.read_in_block(phys, within, chunk)?,
            }
            done += take;
        }
        Ok(n)
    }

    /// Parses the directory entries of one block (or of inline data) into (name, inode).
    fn parse_entries(&self, dir: u64, data: &[u8], out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
        let mut at = 0;
        while at + 8 <= data.len() {
            let ino = le32(data, at) as u64;
            let mut rec_len = le16(data, at + 4) as usize;
            if self.block_size == 65536 && (rec_len == 0 || rec_len == 65535) {
                rec_len = 65536;
            }
            let name_len = if self.filetype {
                data[at + 6] as usize
            } else {
                le16(data, at + 6) as usize
            };
            if rec_len < 8 || at + rec_len > data.len() || 8 + name_len > rec_len {
                return Err(corrupt(format!(
                    "directory {dir}: entry at byte {at} has record length {rec_len}"
                )));
            }
            let name = &data[at + 8..at + 8 + name_len];
            if ino != 0 && name != b"." && name != b".." {
                out.push((name.to_vec(), ino));
            }
            at += rec_len;
        }
        Ok(())
    }
}

/// The run that starts at `table[i]`: contiguous block pointers, or zero pointers (a hole).
fn run_of(table: &[u32], i: usize) -> Run {
    let first = table[i] as u64;
    let mut len = 1;
    while let Some(&next) = table.get(i + len as usize) {
        let expected = if first == 0 { 0 } else { first + len };
        if next as u64 != expected {
            break;
        }
        len += 1;
    }
    if first == 0 {
        Run::Hole { len }
    } else {
        Run::Data { phys: first, len }
    }
}

/// Where the group descriptors are.
struct Geometry {
    first_data_block: u64,
    blocks_per_group: u64,
    desc_size: u64,
    sparse_super: bool,
    meta_bg: bool,
    first_meta_bg: u64,
}

impl Geometry {
    /// The block holding descriptor block `nr` (the kernel's `descriptor_loc`): right after
    /// the superblock, or with meta_bg at the start of the meta group it describes.
    fn descriptor_block(&self, nr: u64, per_block: u64, block_size: u64) -> u64 {
        if !self.meta_bg || nr < self.first_meta_bg {
            return self.first_data_block + 1 + nr;
        }
        let group = nr * per_block;
        let mut skip = u64::from(self.has_super(group));
        if block_size == 1024 && nr == 0 && self.first_data_block == 0 {
            skip += 1;
        }
        group * self.blocks_per_group + self.first_data_block + skip
    }

    fn has_super(&self, group: u64) -> bool {
        if !self.sparse_super || group <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < group {
                p *= base;
            }
            p == group
        })
    }
}

impl FileSystem for Ext4 {
    fn kind(&self) -> FsKind {
        FsKind::Ext4
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn root(&self) -> Result<Node> {
        let root = self.inode(2)?;
        Ok(self.node(&root))
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<DirEntry>> {
        let inode = self.inode(dir.id)?;
        if inode.mode & 0xF000 != 0x4000 {
            return Err(Error::NotADirectory(format!("inode {}", dir.id)));
        }
        self.check_readable(&inode)?;
        let mut names = Vec::new();
        if inode.flags & FL_INLINE_DATA != 0 {
            // The parent's inode number, then entries in the rest of i_block and in the
            // system.data attribute, each region parsed on its own.
            let data = self.inline_data(&inode)?;
            self.parse_entries(dir.id, &data[4..60], &mut names)?;
            self.parse_entries(dir.id, &data[60..], &mut names)?;
        } else {
            let mut block = vec![0u8; self.block_size as usize];
            let mut offset = 0;
            while offset < inode.size {
                let n = self.read_inode_data(&inode, offset, &mut block)?;
                if n == 0 {
                    break;
                }
                self.parse_entries(dir.id, &block[..n], &mut names)?;
                offset += n as u64;
            }
        }
        names
            .into_iter()
            .map(|(name, ino)| {
                let child = self.read_inode(ino)?;
                Ok(DirEntry {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    node: self.node(&child),
                })
            })
            .collect()
    }

    fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.inode(file.id)?;
        self.check_readable(&inode)?;
        self.read_inode_data(&inode, offset, buf)
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        let inode = self.inode(link.id)?;
        if inode.mode & 0xF000 != 0xA000 {
            return Err(corrupt(format!("inode {} is not a symbolic link", link.id)));
        }
        self.check_readable(&inode)?;
        if inode.size > SYMLINK_MAX {
            return Err(corrupt(format!(
                "symbolic link {} is {} bytes long",
                link.id, inode.size
            )));
        }
        let acl_sectors = if inode.file_acl != 0 {
            self.block_size / 512
        } else {
            0
        };
        // A fast symlink keeps its target in i_block and has no data blocks.
        let fast = inode.flags & (FL_INLINE_DATA | FL_EXTENTS) == 0
            && inode.size < 60
            && inode.sectors.saturating_sub(acl_sectors) == 0;
        if fast {
            return Ok(inode.block[..inode.size as usize].to_vec());
        }
        let mut target = vec![0u8; inode.size as usize];
        let n = self.read_inode_data(&inode, 0, &mut target)?;
        target.truncate(n);
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_map_run_stops_where_pointers_stop_being_contiguous() {
        assert_eq!(run_of(&[5, 6, 7, 9, 0], 0), Run::Data { phys: 5, len: 3 });
        assert_eq!(run_of(&[5, 6, 0, 0, 3], 2), Run::Hole { len: 2 });
        assert_eq!(run_of(&[5, 6, 7], 2), Run::Data { phys: 7, len: 1 });
    }

    #[test]
    fn backup_superblocks_are_in_groups_0_1_and_powers_of_3_5_7() {
        let g = Geometry {
            first_data_block: 0,
            blocks_per_group: 32768,
            desc_size: 64,
            sparse_super: true,
            meta_bg: false,
            first_meta_bg: 0,
        };
        let with: Vec<u64> = (0..60).filter(|&n| g.has_super(n)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }
}
