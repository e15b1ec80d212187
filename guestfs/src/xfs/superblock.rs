//! The primary superblock (AG 0, sector 0): geometry, version and features.

use super::bytes::{be16, be32, be64, corrupt, unsupported};
use crate::{ReadAt, Result};

pub(super) const MAGIC: &[u8; 4] = b"XFSB";
const SIZE: usize = 264;

// sb_versionnum bits (v4 file systems advertise their features here).
const VERSION_DIRV2: u16 = 0x2000;
const VERSION_MOREBITS: u16 = 0x8000;
// sb_features2, for v4.
const FEATURES2_FTYPE: u32 = 0x200;

// sb_features_incompat (v5): what a reader must understand.
const INCOMPAT_FTYPE: u32 = 1 << 0;
const INCOMPAT_SPINODES: u32 = 1 << 1;
const INCOMPAT_META_UUID: u32 = 1 << 2;
const INCOMPAT_BIGTIME: u32 = 1 << 3;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
const INCOMPAT_NREXT64: u32 = 1 << 5;
const INCOMPAT_EXCHRANGE: u32 = 1 << 6;
const INCOMPAT_PARENT: u32 = 1 << 7;
const INCOMPAT_METADIR: u32 = 1 << 8;
/// Features that change nothing this reader looks at (sparse inode chunks, a separate metadata
/// UUID, file range exchange, parent pointers kept in attributes) or that it decodes (ftype,
/// big timestamps, 64-bit extent counters).
const INCOMPAT_UNDERSTOOD: u32 = INCOMPAT_FTYPE
    | INCOMPAT_SPINODES
    | INCOMPAT_META_UUID
    | INCOMPAT_BIGTIME
    | INCOMPAT_NREXT64
    | INCOMPAT_EXCHRANGE
    | INCOMPAT_PARENT;

/// Directory data lives below this byte offset of a directory; leaf and free-index blocks above.
pub(super) const DIR_LEAF_OFFSET: u64 = 32 << 30;

#[derive(Debug, Clone)]
pub(super) struct Superblock {
    pub version: u8,
    pub block_size: u32,
    pub block_log: u8,
    pub dblocks: u64,
    pub ag_blocks: u32,
    pub ag_count: u32,
    pub ag_block_log: u8,
    pub inode_size: u16,
    pub inodes_per_block_log: u8,
    pub root_ino: u64,
    pub dir_block_log: u8,
    pub has_ftype: bool,
    pub label: Option<String>,
}

impl Superblock {
    pub fn read(volume: &dyn ReadAt) -> Result<Self> {
        let mut buf = [0u8; SIZE];
        volume.read_exact_at(0, &mut buf)?;
        Self::parse(&buf)
    }

    fn parse(b: &[u8; SIZE]) -> Result<Self> {
        if &b[0..4] != MAGIC {
            return Err(corrupt("superblock: no XFSB magic"));
        }
        let versionnum = be16(b, 100);
        let version = (versionnum & 0xf) as u8;
        let block_size = be32(b, 4);
        let block_log = b[120];
        let inode_size = be16(b, 104);
        let inode_log = b[122];
        let inodes_per_block = be16(b, 106);
        let inodes_per_block_log = b[123];
        let ag_blocks = be32(b, 84);
        let ag_count = be32(b, 88);
        let ag_block_log = b[124];
        let dir_block_log = b[192];
        let sb = Superblock {
            version,
            block_size,
            block_log,
            dblocks: be64(b, 8),
            ag_blocks,
            ag_count,
            ag_block_log,
            inode_size,
            inodes_per_block_log,
            root_ino: be64(b, 56),
            dir_block_log,
            has_ftype: false,
            label: label(&b[108..120]),
        };

        match version {
            4 | 5 => {}
            1..=3 => return Err(unsupported(format!("superblock version {version}"))),
            _ => return Err(corrupt(format!("superblock: version {version}"))),
        }
        if !(9..=16).contains(&block_log) || block_size != 1 << block_log {
            return Err(corrupt(format!(
                "superblock: block size {block_size} (log {block_log})"
            )));
        }
        if !(8..=11).contains(&inode_log) || u32::from(inode_size) != 1 << inode_log {
            return Err(corrupt(format!(
                "superblock: inode size {inode_size} (log {inode_log})"
            )));
        }
        if inode_log > block_log
            || inodes_per_block_log != block_log - inode_log
            || u32::from(inodes_per_block) != 1 << inodes_per_block_log
        {
            return Err(corrupt(format!(
                "superblock: {inodes_per_block} inodes per block (log {inodes_per_block_log})"
            )));
        }
        // agblklog is the rounded-up log2 of agblocks; AG-relative block and inode numbers are
        // packed with it, so it must be exact.
        if ag_blocks == 0
            || ag_block_log > 31
            || u64::from(ag_blocks) > 1 << ag_block_log
            || u64::from(ag_blocks) <= (1u64 << ag_block_log) >> 1
        {
            return Err(corrupt(format!(
                "superblock: {ag_blocks} blocks per AG (log {ag_block_log})"
            )));
        }
        if ag_count == 0 || sb.dblocks > u64::from(ag_count) * u64::from(ag_blocks) {
            return Err(corrupt(format!(
                "superblock: {ag_count} AGs of {ag_blocks} blocks for {} blocks",
                sb.dblocks
            )));
        }
        if u32::from(block_log) + u32::from(dir_block_log) > 16 {
            return Err(corrupt(format!(
                "superblock: directory block log {dir_block_log}"
            )));
        }
        if b[126] != 0 {
            return Err(corrupt("superblock: mkfs did not finish (sb_inprogress)"));
        }

        let has_ftype = if version == 5 {
            let incompat = be32(b, 216);
            check_incompat(incompat)?;
            incompat & INCOMPAT_FTYPE != 0
        } else {
            if versionnum & VERSION_DIRV2 == 0 {
                return Err(unsupported("version 1 directories"));
            }
            versionnum & VERSION_MOREBITS != 0 && be32(b, 200) & FEATURES2_FTYPE != 0
        };
        Ok(Superblock { has_ftype, ..sb })
    }

    pub fn has_crc(&self) -> bool {
        self.version == 5
    }

    /// Bytes of a directory block (one or several file system blocks).
    pub fn dir_block_size(&self) -> u32 {
        self.block_size << self.dir_block_log
    }

    /// Bits of an inode number that number the inode inside its AG.
    pub fn ag_ino_log(&self) -> u32 {
        u32::from(self.inodes_per_block_log) + u32::from(self.ag_block_log)
    }

    /// The byte offset of `count` blocks from `fsb`, a file system block number as extent records
    /// and btree pointers hold it (AG number in the high bits, AG block in the low ones).
    pub fn fsb_offset(&self, fsb: u64, count: u64, what: &dyn Fn() -> String) -> Result<u64> {
        let ag = fsb >> self.ag_block_log;
        let ag_block = fsb & ((1u64 << self.ag_block_log) - 1);
        let outside = || {
            corrupt(format!(
                "{}: blocks {fsb}+{count} outside the file system",
                what()
            ))
        };
        if ag >= u64::from(self.ag_count)
            || count > u64::from(self.ag_blocks)
            || ag_block + count > u64::from(self.ag_blocks)
        {
            return Err(outside());
        }
        // Both below 2^32 now: no overflow.
        let linear = ag * u64::from(self.ag_blocks) + ag_block;
        if linear + count > self.dblocks {
            return Err(outside());
        }
        Ok(linear << self.block_log)
    }
}

fn check_incompat(incompat: u32) -> Result<()> {
    let unknown = incompat & !INCOMPAT_UNDERSTOOD;
    if unknown == 0 {
        return Ok(());
    }
    let mut names = Vec::new();
    for (bit, name) in [
        (
            INCOMPAT_NEEDSREPAIR,
            "needsrepair (xfs_repair must run first)",
        ),
        (INCOMPAT_METADIR, "metadir"),
    ] {
        if unknown & bit != 0 {
            names.push(name.to_owned());
        }
    }
    let rest = unknown & !(INCOMPAT_NEEDSREPAIR | INCOMPAT_METADIR);
    if rest != 0 {
        names.push(format!("unknown incompatible features {rest:#x}"));
    }
    Err(unsupported(names.join(", ")))
}

fn label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let label = String::from_utf8_lossy(&raw[..end]).into_owned();
    (!label.is_empty()).then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The superblock mkfs.xfs 6.1 writes for a 300 MiB volume, fields set one by one.
    fn v5() -> [u8; SIZE] {
        let mut b = [0u8; SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&4096u32.to_be_bytes());
        b[8..16].copy_from_slice(&76800u64.to_be_bytes());
        b[56..64].copy_from_slice(&128u64.to_be_bytes());
        b[84..88].copy_from_slice(&19200u32.to_be_bytes());
        b[88..92].copy_from_slice(&4u32.to_be_bytes());
        b[100..102].copy_from_slice(&0xb4a5u16.to_be_bytes());
        b[104..106].copy_from_slice(&512u16.to_be_bytes());
        b[106..108].copy_from_slice(&8u16.to_be_bytes());
        b[108..113].copy_from_slice(b"guest");
        b[120] = 12;
        b[122] = 9;
        b[123] = 3;
        b[124] = 15;
        b[216..220].copy_from_slice(&0xbu32.to_be_bytes());
        b
    }

    #[test]
    fn a_v5_superblock_gives_geometry_features_and_label() {
        let sb = Superblock::parse(&v5()).unwrap();
        assert_eq!(sb.version, 5);
        assert_eq!(sb.block_size, 4096);
        assert_eq!(sb.ag_ino_log(), 18);
        assert!(sb.has_ftype);
        assert_eq!(sb.label.as_deref(), Some("guest"));
        assert_eq!(
            sb.fsb_offset((1 << 15) | 3, 1, &|| "x".into()).unwrap(),
            (19203) << 12
        );
        assert!(sb.fsb_offset((4 << 15) | 3, 1, &|| "x".into()).is_err());
        assert!(sb.fsb_offset(19199, 2, &|| "x".into()).is_err());
    }

    #[test]
    fn unknown_incompatible_features_are_refused_by_name() {
        let mut b = v5();
        b[216..220].copy_from_slice(&(0xb | INCOMPAT_NEEDSREPAIR | 1 << 20).to_be_bytes());
        let err = Superblock::parse(&b).unwrap_err().to_string();
        assert!(err.contains("needsrepair"), "{err}");
        assert!(err.contains("0x100000"), "{err}");
    }

    #[test]
    fn inconsistent_geometry_is_corrupt_not_a_panic() {
        for (at, value) in [(120, 40u8), (122, 3), (123, 9), (124, 40), (124, 2)] {
            let mut b = v5();
            b[at] = value;
            assert!(matches!(
                Superblock::parse(&b),
                Err(crate::Error::Corrupt { .. })
            ));
        }
    }
}
